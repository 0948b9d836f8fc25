"""Editing methods, one module each; importing this package registers them all."""

from . import (
    calinet,  # noqa: F401
    dama,  # noqa: F401
    depn,  # noqa: F401
    enn,  # noqa: F401
    ffn_promote,  # noqa: F401
    ft,  # noqa: F401
    grace,  # noqa: F401
    ike,  # noqa: F401
    ke,  # noqa: F401
    kn,  # noqa: F401
    lsdm,  # noqa: F401
    memit,  # noqa: F401
    mend,  # noqa: F401
    nl_patch,  # noqa: F401
    rome,  # noqa: F401
    serac,  # noqa: F401
    tpatcher,  # noqa: F401
)
