import pytest
import torch
from torch import nn

from medit_lite.hooks import Hooks


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_capture_input_and_output():
    net, x = _net(), torch.randn(5, 4)
    with Hooks() as h:
        inp = h.capture_input(net[2])
        out = h.capture_output(net[2])
        y = net(x)
    assert torch.equal(out.value, y)
    assert torch.equal(inp.value, torch.relu(net[0](x)))
    assert len(inp.values) == 1


def test_edit_output_and_input():
    net, x = _net(), torch.randn(5, 4)
    clean = net(x)
    with Hooks() as h:
        h.edit_output(net[0], lambda t: t * 0)
        assert torch.allclose(net(x), net[2].bias.expand(5, 2))
    with Hooks() as h:
        h.edit_input(net[2], lambda t: t + 1)
        shifted = net(x)
    assert torch.allclose(shifted, clean + net[2].weight.sum(1))


def test_hooks_removed_on_exit_and_on_exception():
    net, x = _net(), torch.randn(2, 4)
    clean = net(x)
    with pytest.raises(RuntimeError):
        with Hooks() as h:
            h.edit_output(net[0], lambda t: t * 0)
            raise RuntimeError("boom")
    assert not net[0]._forward_hooks and not net[0]._forward_pre_hooks
    assert torch.equal(net(x), clean)


def test_tuple_outputs_keep_their_other_parts():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, "extra"

    with Hooks() as h:
        box = h.capture_output(Pair())
        h.edit_output(m := Pair(), lambda t: t + 1)
        out = m(torch.ones(2))
    assert out[1] == "extra" and torch.equal(out[0], torch.full((2,), 3.0))
    assert box.value is None  # that module was never called
