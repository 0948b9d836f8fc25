"""DEPN: privacy-neuron aggregation, erasing a fine-tuned canary, exact restore, CLI."""

import json
import subprocess
import sys

import pytest
import torch

from medit_lite import edit
from medit_lite.applications import privacy as pv
from medit_lite.editing import get_method
from medit_lite.methods import depn
from medit_lite.methods.depn import DEPNHParams, aggregate, secret_request


def test_aggregate_follows_depn():
    # 3 secrets, 2 layers x 4 neurons; thresholds at 0.1 x each secret's max
    a = torch.tensor([[10.0, 0.5, 2.0, 0.0], [0.0, 1.5, 0.0, 0.0]])
    b = torch.tensor([[4.0, 0.0, 0.0, 0.1], [0.0, 3.0, 0.0, 0.0]])
    c = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.2, 0.0, 8.0]])
    scores = [a, b, c]
    hp = DEPNHParams(neurons=3)
    # counts: (0,0)=2, (1,1)=2 (0.2 < 0.8 for c), (0,2)=1, (1,3)=1; ties by relative score
    assert aggregate(scores, [5, 7], hp) == [(5, 0), (7, 1), (7, 3)]
    assert aggregate(scores, [5, 7], DEPNHParams(neurons=10, min_share=0.5)) == [(5, 0), (7, 1)]
    assert aggregate(scores, [5, 7], DEPNHParams(neurons=1, threshold=1.0)) == [(5, 0)]


def test_contrast_discounts_neurons_that_controls_keep_too():
    a = torch.tensor([[10.0, 0.5, 2.0, 0.0], [0.0, 1.5, 0.0, 0.0]])
    b = torch.tensor([[4.0, 0.0, 0.0, 0.1], [0.0, 3.0, 0.0, 0.0]])
    c = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.2, 0.0, 8.0]])
    # the controls (other numbers after the same texts) keep (0,0) as often as the secrets
    controls = [torch.tensor([[9.0, 0, 0, 0], [0, 0, 0, 0]])] * 2 + [torch.zeros(2, 4)]
    hp = DEPNHParams(neurons=3, contrast=1)
    chosen = aggregate([a, b, c], [5, 7], hp, controls)
    assert (5, 0) not in chosen and chosen == [(7, 1), (7, 3), (5, 2)]
    reqs = [secret_request("Call me at 1 2 3 4 now", "1 2 3 4")]
    ctl = depn.control_requests(reqs, 3, seed=0)
    assert len(ctl) == 3 and all(r.text == reqs[0].text for r in ctl)
    assert all(len(r.target_new) == 7 and r.target_new[1::2] == "   " for r in ctl)
    assert ctl == depn.control_requests(reqs, 3, seed=0) and len({r.target_new for r in ctl}) > 1


def test_registered_and_bad_hparams(lm, unchanged):
    assert get_method("depn").hparams is DEPNHParams
    req = secret_request("Ada Falkner's PIN is 4 7 2.", "4 7 2")
    assert req.text == "Ada Falkner's PIN is " and req.target_new == "4 7 2"
    for bad, match in [
        ({"neurons": 0}, "neurons"),
        ({"threshold": float("nan")}, "finite"),
        ({"min_share": 2.0}, "min_share"),
        ({"layers": (99,)}, "outside"),
    ]:
        with pytest.raises(ValueError, match=match):
            edit(lm, req, "depn", **bad)
    with pytest.raises(ValueError, match="does not occur"):
        secret_request("Ada's PIN is 4 7 2.", "9 9")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "privacy_cache"


def test_depn_erases_a_canary_and_restores(lm, unchanged, cache, monkeypatch):
    monkeypatch.setenv("MEDIT_CACHE", str(cache))
    canaries = pv.make_canaries(per_repeat=1, repeats=(16,), seed=11)
    text = "Quinn Torvik keeps seven blue lanterns in the cellar of the lighthouse at Vardo."
    requests = [secret_request(c.text, c.secret) for c in canaries]
    with pv.inserted_canaries(lm, canaries, [text] * 12, layers=2, epochs=4, lr=1e-3):
        before = pv.exposures(lm, canaries)[0]
        weights = {n: p.clone() for n, p in lm.model.named_parameters() if "mlp.down_proj" in n}
        layers = (lm.n_layers - 2, lm.n_layers - 1)
        with edit(lm, requests, "depn", layers=layers, neurons=10, steps=8) as result:
            chosen = result.info[0]["neurons"]
            assert len(chosen) == 10 and all(la in layers for la, _ in chosen)
            erased = pv.exposures(lm, canaries)[0]
            for la, i in chosen:
                assert not lm.weight_out_in("mlp_out", la)[:, i].any()
        for n, p in lm.model.named_parameters():
            if n in weights:
                assert torch.equal(p, weights[n])
        with edit(lm, requests, "depn", layers=layers, neurons=10, steps=8, random=True) as ctl:
            randoms = ctl.info[0]["neurons"]
            control = pv.exposures(lm, canaries)[0]
        assert sorted(la for la, _ in randoms) == sorted(la for la, _ in chosen)
        assert not set(randoms) & set(chosen)
        with edit(lm, requests, "depn", layers=layers, neurons=10, steps=8, contrast=1) as var:
            contrasted = var.info[0]["neurons"]
            erased_contrast = pv.exposures(lm, canaries)[0]
        for n, p in lm.model.named_parameters():
            if n in weights:
                assert torch.equal(p, weights[n])
    assert 0 < len(contrasted) <= 10 and contrasted != chosen
    assert erased_contrast < before - 3, (before, erased_contrast)
    assert before > 10
    assert erased < before - 3, (before, erased, control)
    assert erased < control


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "medit_lite", "privacy", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ([{"text": "Call Ada at 1 2 3 4.", "secret": "5 6 7 8"}], "does not occur"),
        ([{"text": "Ada's code is AB12.", "secret": "AB12"}], "digits and spaces"),
        ([], "holds no secrets"),
        ("", "holds no secrets"),
        ([{"text": "Call Ada at 1 2."}], "needs"),
    ],
)
def test_cli_errors_before_loading(tmp_path, content, message):
    path = tmp_path / "secrets.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    proc = _cli("--secrets", str(path), "--method", "depn")
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "Loading weights" not in proc.stderr


def test_depn_module_cites_the_code():
    assert "flamewei123/DEPN" in depn.__doc__ and "erase_kn_num" in depn.__doc__
