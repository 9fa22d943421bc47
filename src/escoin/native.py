"""For compiled code built on escoin (a framework's native handler): where the C header is, and
the core's entries as a table, so that such code calls the core this package already loaded
instead of linking a second copy of it."""
from __future__ import annotations

import os

from escoin import _core


def get_include() -> str:
    """The directory holding ``escoin/escoin.h`` (the C contract), for a compiler's -I."""
    here = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(here, "include")
    if os.path.isfile(os.path.join(installed, "escoin", "escoin.h")):
        return installed
    # A source checkout run in place: the header lives with the core.
    return os.path.join(os.path.dirname(os.path.dirname(here)), "cuda", "include")


def c_api() -> object:
    """A PyCapsule named ``"escoin.c_api"`` holding a pointer to this build's ``escoin_api_t``
    (escoin.h): the forward entries, the layout and workspace queries and the last error text.
    Valid for as long as the process runs."""
    return _core.c_api()
