"""Editing methods, one module each; importing this package registers them all."""

from . import ft  # noqa: F401
