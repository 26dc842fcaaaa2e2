"""Cold start: Python's cyclic garbage collector, paused while setup imports the libraries and loads the
model.

torch, diffusers and transformers make about 0.45 M objects that live as long as the process. With the
collector on, the imports trigger collection after collection, and each full one walks every object
made so far: 0.7-0.9 s of a 5.5 s import on the 2-core CPU machine of bench/RESULTS.md. Paused, the
collector walks them once, when setup ends (0.3 s there), and leaves them in the oldest generation,
which predictions rarely reach (no full collection in 200 tiny-model predictions, measured). They are
not frozen (`gc.freeze`, which would save that walk too): an object made in setup that later drops out
of use inside a reference cycle (a CUDA graph recorded again, say) would then never be freed.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection inside; on the way out, one collection (what the block left in reference
    cycles is freed, the rest moves to the oldest generation), and the collector as it was."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.collect()
        if was_enabled:
            gc.enable()
