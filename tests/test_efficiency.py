"""Measuring what an edit costs (chapter 1's efficiency): the allocation trace sees what
torch allocates on the CPU (peak and retained, against tensors of known size), and
``edit_cost`` on the real model tells a weight edit (FT-L: elements of one matrix
changed, a backup, nothing attached) from a codebook (GRACE: no weight changed, the
codebook attached), restoring the weights exactly."""

import pytest
import torch

from medit_lite import edit, weights_fingerprint
from medit_lite.efficiency import edit_cost
from medit_lite.memory import allocation_trace

MB = 1_000_000


def test_allocation_trace_sees_peak_and_retained_cpu_memory():
    def work():
        kept = torch.zeros(MB, dtype=torch.uint8)  # 1 MB, returned
        temporary = torch.zeros(3 * MB, dtype=torch.uint8)  # 3 MB, freed on return
        return kept + temporary[:MB]  # another 1 MB, returned (kept and temporary are freed)

    value, peak, retained = allocation_trace(work)
    assert value.numel() == MB
    assert 5 * MB <= peak < 5 * MB + 100_000  # all three alive together
    assert 1 * MB <= retained < 1 * MB + 100_000  # only the returned sum


def test_edit_measures_memory_only_when_asked_on_the_cpu(lm, facts, unchanged):
    with edit(lm, facts[0], "ft-l", steps=2) as plain:
        assert plain.peak_memory_bytes is None and plain.retained_memory_bytes is None
    with edit(lm, facts[0], "ft-l", steps=2, measure_memory=True) as measured:
        # at least the matrix's gradient and the optimiser's two moments
        matrix = lm.model.get_parameter(measured.changed[0])
        assert measured.peak_memory_bytes >= 3 * matrix.numel() * matrix.element_size()


def test_edit_cost_tells_a_weight_edit_from_a_codebook(lm, facts, fingerprint):
    ftl = edit_cost(lm, facts[0], "ft-l", runs=1, steps=3)
    matrix = lm.model.get_parameter(lm.module_name("mlp_out", 0) + ".weight")
    assert ftl.matrices_changed == 1 and 0 < ftl.params_changed <= matrix.numel()
    assert ftl.backup_bytes == matrix.numel() * matrix.element_size()
    assert ftl.added_bytes < 64_000 and ftl.peak_bytes > ftl.backup_bytes
    assert ftl.seconds > 0 and ftl.params_total == sum(p.numel() for p in lm.model.parameters())

    grace = edit_cost(lm, facts[0], "grace", runs=1)
    assert grace.params_changed == 0 and grace.matrices_changed == 0 and grace.backup_bytes == 0
    assert grace.added_bytes >= lm.d_model * 4  # at least one key of the codebook
    assert weights_fingerprint(lm) == fingerprint


def test_edit_cost_rejects_no_runs(lm, facts):
    with pytest.raises(ValueError, match="runs"):
        edit_cost(lm, facts[0], "ft-l", runs=0)
