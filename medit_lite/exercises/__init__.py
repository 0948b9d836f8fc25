"""Checkers for the book's exercises: one module per chapter.

Each checker runs a student's function against the package's reference on several
cases, and on failure says what to look at (recognising common mistakes). The solutions
are kept here, out of the notebooks: ``show_solution("1.1")`` prints one.
"""

from .check import CheckResult, show_solution, solution

__all__ = ["CheckResult", "show_solution", "solution"]
