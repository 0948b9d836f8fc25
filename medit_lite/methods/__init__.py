"""Editing methods, one module each; importing this package registers them all."""

from . import (
    ft,  # noqa: F401
    memit,  # noqa: F401
    rome,  # noqa: F401
    tpatcher,  # noqa: F401
)
