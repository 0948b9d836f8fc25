"""Checkers for the book's exercises: one module per chapter.

Each checker runs a student's function against the package's reference on several
cases, and on failure says what to look at (recognising common mistakes).
"""

from .check import CheckResult

__all__ = ["CheckResult"]
