"""The shared machinery of every exercise checker."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class CheckResult:
    """Outcome of a check; truthy when passed. Displays as a short message."""

    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return ("✅ " if self.passed else "❌ ") + self.message


def _close(a, b, tol: float = 1e-6) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol)
    except (TypeError, ValueError):
        return False


def is_reference(fn: Callable, references: Sequence[Callable]) -> bool:
    """Whether ``fn`` is one of ``references`` (the package's own answer) under another
    name: the same object, a ``functools.partial`` or ``functools.wraps`` wrapper of it, or
    a function with the same code object."""
    for ref in references:
        if fn is ref or getattr(fn, "__wrapped__", None) is ref:
            return True
        if isinstance(fn, functools.partial) and fn.func is ref:
            return True
        code = getattr(fn, "__code__", None)
        if code is not None and code is getattr(ref, "__code__", None):
            return True
    return False


def refusal(name: str, fn: Callable, references: Sequence[Callable]) -> CheckResult | None:
    """A failed check when ``fn`` is the package's own function, else None."""
    if is_reference(fn, references):
        return CheckResult(
            False, f"{name}: that is the package's own function; write yours in the stub."
        )
    return None


def run_check(
    name: str,
    fn: Callable,
    reference: Callable,
    cases: Sequence[tuple],
    mistakes: Sequence[tuple[Callable, str]] = (),
    raise_on_fail: bool = False,
    refuse: Sequence[Callable] = (),
) -> CheckResult:
    """Compare ``fn`` with ``reference`` on ``cases``; explain the first difference.

    ``mistakes`` pairs a typical wrong implementation with the hint to give when the
    student's answers match it on every case. The reference itself, and the package's
    functions in ``refuse``, are refused: handing in the package's answer teaches nothing.
    """
    result = refusal(name, fn, (reference, *refuse))
    if result is None:  # (a failed CheckResult is falsy: test for None)
        result = _compare(name, fn, reference, cases, mistakes)
    print(repr(result))
    if raise_on_fail and not result:
        raise AssertionError(result.message)
    return result


def _compare(name, fn, reference, cases, mistakes) -> CheckResult:
    answers = []
    for args in cases:
        try:
            answers.append(fn(*args))
        except NotImplementedError:
            return CheckResult(
                False, f"{name}: not implemented yet (it raised NotImplementedError)."
            )
        except Exception as exc:  # a student's bug: report it, don't crash the notebook
            return CheckResult(False, f"{name} raised {type(exc).__name__}: {exc} on input {args}.")
    expected = [reference(*args) for args in cases]
    wrong = [i for i, (a, e) in enumerate(zip(answers, expected)) if not _close(a, e)]
    if not wrong:
        return CheckResult(True, f"{name}: correct on all {len(cases)} cases.")
    for broken, hint in mistakes:
        if all(_close(a, broken(*args)) for a, args in zip(answers, cases)):
            return CheckResult(False, f"{name}: {hint}")
    i = wrong[0]
    return CheckResult(
        False,
        f"{name}: on input {cases[i]} expected {expected[i]!r}, got {answers[i]!r} "
        f"({len(wrong)} of {len(cases)} cases differ).",
    )


def report(result: CheckResult, raise_on_fail: bool = False) -> CheckResult:
    """Print a check's outcome; raise AssertionError on failure if asked."""
    print(repr(result))
    if raise_on_fail and not result:
        raise AssertionError(result.message)
    return result


def call_answer(name: str, fn: Callable, *args) -> tuple[object, CheckResult | None]:
    """``(fn(*args), None)``, or ``(None, failure)`` explaining a stub that raised
    NotImplementedError or an answer that raised: a student's bug must not crash the page."""
    try:
        return fn(*args), None
    except NotImplementedError:
        stub = f"{name}: not implemented yet (it raised NotImplementedError)."
        return None, CheckResult(False, stub)
    except Exception as exc:
        return None, CheckResult(False, f"{name} raised {type(exc).__name__}: {exc}")


# -- solutions: one registry for every chapter -------------------------------------------
SOLUTIONS: dict[str, str] = {}
"""Solution source of each exercise, by key ("1.1", "grace", ...); filled by the chapter
modules when they are imported (:func:`add_solution`)."""

_CHAPTERS = ("ch01", "ch02", "ch03", "ch04", "ch05")


def add_solution(key: str, source: str) -> None:
    """Register the solution ``source`` (Python code defining one function) as ``key``."""
    if key in SOLUTIONS and SOLUTIONS[key] != source:
        raise ValueError(f"two different solutions registered as {key!r}")
    SOLUTIONS[key] = source


def _lookup(key: str) -> str:
    if key not in SOLUTIONS:  # a key of a chapter module not imported yet
        import importlib

        for name in _CHAPTERS:
            importlib.import_module(f"{__package__}.{name}")
    if key not in SOLUTIONS:
        raise ValueError(f"no exercise {key!r}; the exercises are {', '.join(SOLUTIONS)}")
    return SOLUTIONS[key]


def show_solution(key: str) -> None:
    """Print the solution of exercise ``key`` (e.g. ``"1.1"``, ``"4.4"``, ``"grace"``).

    The solutions live in :mod:`medit_lite.exercises`, not in the notebooks, so that they
    stay hidden until asked for (Colab shows every cell of a notebook).
    """
    print(_lookup(key))


def solution(key: str) -> Callable:
    """The solution of exercise ``key`` as a function (for the pages' hidden checks), built
    from its source; a fresh function, so the checkers treat it as a student's answer."""
    import math as _math

    import torch

    namespace: dict = {"torch": torch, "math": _math}
    source = _lookup(key)
    exec(compile(source, f"<solution {key}>", "exec"), namespace)  # noqa: S102
    defined = [v for k, v in namespace.items() if k not in ("torch", "math") and callable(v)]
    if not defined:
        raise ValueError(f"solution {key!r} defines no function")
    return defined[-1]
