"""Cold start: what Cog's setup does, in the order that makes it quickest.

The weights are found, verified and read in a background thread while torch, diffusers and
transformers import (`weights.resolve_weights_ahead`), and Python's cyclic garbage collector is paused
meanwhile. The imports make ~0.67 M objects, nearly all of them for the life of the process (modules,
classes, functions). With the collector on, each import triggers collections, and every full one
walks all the objects made so far: about a thousand collections, a sizeable part of setup
(bench/RESULTS.md, "Cold start"). So the collector stays off, what the imports made is frozen (`gc.freeze`: left to
reference counting, out of every later collection; their ~7 MB of import-time garbage stays with
them), and one collection at the end walks only what loading the model made, a few milliseconds.
The model's objects are not frozen: a CUDA graph recorded again later, or a failed run's tensors,
must stay collectable (`pipeline.release_memory` collects).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .service import Inpainter


def load(weights: str | os.PathLike | None) -> Inpainter:
    """The model ready to serve, from COG_WEIGHTS (`weights`, a folder or a tar URL), else the settings'
    weights folder, downloaded there if empty; settings from the environment (config.Settings)."""
    with collector_paused():
        from .config import Settings
        from .weights import resolve_weights_ahead

        logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("inpaint").setLevel(logging.INFO)
        # Pillow warns once per damaged EXIF tag, naming the tag, so Python's once-per-text default let a
        # crafted 66 KB JPEG put 10,000 lines into a prediction's logs; only the orientation is read here.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
        settings = Settings.from_env()
        folder = resolve_weights_ahead(weights, settings)  # the disk work runs while the libraries import
        from .service import Inpainter  # torch, diffusers, transformers: most of a cold start
        from . import environment

        environment.check_server()
        environment.check_gpu(settings.device)
        gc.freeze()
        return Inpainter.load(folder, settings, from_image=not weights)


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection inside; on the way out, one collection (what the block left in reference
    cycles and did not freeze is freed), and the collector as it was."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.collect()
        if was_enabled:
            gc.enable()
