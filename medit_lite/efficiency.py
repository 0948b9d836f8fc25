"""What an edit costs: efficiency (高效性), the fifth property of chapter 1.

:func:`edit_cost` edits one request with one method and reports the wall time of the
edit, the memory it *allocates* (its peak above what was allocated when it began, as
:mod:`medit_lite.memory` measures it), the memory the edit leaves allocated beside the
weights (a codebook, patch neurons, an edit memory: the state it attaches), the backup
that :meth:`EditResult.restore` keeps, and how many of the model's weights it changed.
The timed runs do not run under the profiler; a separate, last run measures memory.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from .editing import edit
from .models import LM


@dataclass
class EditCost:
    """The cost of editing one request with one method."""

    method: str
    seconds: float  # median wall time of the edit over the timed runs (restore excluded)
    runs: int  # timed runs
    peak_bytes: int  # most memory allocated at one time during the edit, above its start
    added_bytes: int  # still allocated after the edit: the state attached to the model
    backup_bytes: int  # saved copies of the weights the method may change (for restore)
    params_changed: int  # elements of the model's parameters that differ after the edit
    matrices_changed: int  # parameter tensors with any changed element
    params_total: int  # elements of all the model's parameters

    def as_dict(self) -> dict:
        return asdict(self)


def edit_cost(lm: LM, request, method: str, *, runs: int = 3, **overrides) -> EditCost:
    """Edit ``request`` with ``method`` ``runs + 2`` times, restoring after each.

    The first edit warms up (a trained editor or cached key statistics are read from
    disk), the next ``runs`` are timed, the last is measured for memory (on the CPU under
    the profiler). The model's weights are restored exactly after each edit."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    edit(lm, request, method, **overrides).restore()  # warm-up
    seconds = []
    for _ in range(runs):
        with edit(lm, request, method, measure_memory=False, **overrides) as result:
            seconds.append(result.seconds)
    with edit(lm, request, method, measure_memory=True, **overrides) as result:
        backup = result.original_weights
        return EditCost(
            method=method,
            seconds=statistics.median(seconds),
            runs=runs,
            peak_bytes=int(result.peak_memory_bytes),
            added_bytes=int(result.retained_memory_bytes),
            backup_bytes=sum(t.numel() * t.element_size() for t in backup.values()),
            params_changed=result.changed_elements(),
            matrices_changed=len(result.changed),
            params_total=sum(p.numel() for p in lm.model.parameters()),
        )
