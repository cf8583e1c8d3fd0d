"""Pausing Python's cyclic garbage collector around bulk work on acyclic data.

Decoding a 100,000-instance catalog and planning over it allocates millions of objects; every
generation-2 collection then walks all of them and finds nothing (the data has no reference cycles,
refcounting frees it). Pausing the collector roughly halves planning time on a large catalog.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
