"""The GPU fast path: one object the service owns, which does nothing on the CPU.

`FastPath.install(pipe)` sets a channels_last UNet and a VAE that decodes one image at a time, and
routes the UNet's and the VAE encoder's and decoder's calls through a FastPart each. A FastPart is
the one place that decides how a call runs (`FastPart.run`):

  compiled or eager   the compiled function taken up for the call's ShapeKey, if any
                      (compiler.py: compiled in the background, checked against the eager part);
  as a CUDA graph     replayed when the part keeps graphs (the UNet's) and the call qualifies
                      (graphs.py), recorded from whichever of the two runs it, keyed apart.

Everything else (extra keyword inputs, autograd, CPU tensors) runs the module's own forward.
`prediction()` is held around each prediction: it takes up the compiled parts that are ready, and
the compile worker's own work in this process waits for it to end (turns.py). `warm_up` pays CUDA's
first-use costs during setup.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .. import cachetrust
from . import artifact as shipped
from .compiler import MAX_SHAPES, PARTS, CompiledPart, Compiler, usable_folder, describe, first
from .graphs import MAX_POSITIONS, Graphs
from .keys import GraphKey, ShapeKey

log = logging.getLogger(__name__)

# The working size setup warms up and waits for the shipped compiled parts of: the model's own (SD2
# inpainting's training size) and the automatic size of a square region. A bake holds every automatic
# size by default, and each part takes a while to load, so the parts at other sizes load after READY.
SETUP_SIZE = 512
# How the log says a prediction took up a compiled part (bench/coldstart.py reads it from a server's log).
TAKE_UP = "this prediction uses the compiled "

__all__ = ["FastPath", "FastPart", "ShapeKey", "GraphKey", "Graphs", "CompiledPart", "Compiler", "PARTS", "TAKE_UP"]


def plain_kwargs(kwargs: dict[str, Any]) -> bool:
    """True when the extra keyword inputs are all empty, as in the denoising loop of SD2 inpainting."""
    return all(value is None or (isinstance(value, dict) and not value) for value in kwargs.values())


def _inference_call(*values) -> bool:
    return all(isinstance(value, torch.Tensor) for value in values) and not torch.is_grad_enabled()


def unet_output(sample: torch.Tensor):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


class FastPart:
    """Stands in for one part's `forward` (the module, its config and weights stay as they are).

    As is, for the VAE's encoder and decoder (one tensor in, one out); UNetPart has the UNet's call."""

    def __init__(self, module: torch.nn.Module, part: str, compiled: CompiledPart | None = None,
                 graphs: Graphs | None = None) -> None:
        self.module = module
        self.part = part
        self.eager = module.forward
        self.fixed = PARTS[part].fixed
        self.compiled = compiled
        self.graphs = graphs

    def __call__(self, *args: Any, **kwargs: Any):
        if len(args) == 1 and plain_kwargs(kwargs) and _inference_call(*args):
            return self.run(args)
        return self.eager(*args, **kwargs)

    def run(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The part's output for these inputs: compiled or eager, replayed as a CUDA graph where it may be."""
        key = ShapeKey.of(*inputs)
        function = self.compiled.function(key) if self.compiled is not None else None
        call = self._call(function)
        if self.graphs is None or not self.graphs.replayable(key):
            return call(*inputs)
        output, recorded = self.graphs.run(GraphKey(key, function is not None), call, inputs)
        if not recorded and function is not None:
            self.compiled.reject(key)  # back to the uncompiled part; its graph is recorded at the next call
        return output

    def _call(self, function) -> Callable[..., torch.Tensor]:
        if function is None:
            return lambda *inputs: first(self.eager(*inputs, **self.fixed))

        def compiled(*inputs: torch.Tensor) -> torch.Tensor:
            if function.guard_check(self.module, *inputs, **self.fixed):
                return first(function(self.module, *inputs, **self.fixed))
            return first(self.eager(*inputs, **self.fixed))

        return compiled


class UNetPart(FastPart):
    """Stands in for `unet.forward`: the UNet's own call (its output a tuple or a UNet2DConditionOutput)."""

    def __call__(self, sample, timestep, encoder_hidden_states, *args: Any, return_dict: bool = True, **kwargs: Any):
        if args or not plain_kwargs(kwargs) or not _inference_call(sample, timestep, encoder_hidden_states):
            return self.eager(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        output = self.run((sample, timestep.to(sample.device), encoder_hidden_states))
        return (output,) if not return_dict else unet_output(output)


class FastPath:
    """Every GPU speed-up of one pipeline, behind one switch (`enabled`); see the module's docstring.

    None of these changes what is computed beyond fp16 rounding (the bench checks agreement with
    plain diffusers). Each choice rests on bench/RESULTS.md, "Fast path parts" (H100): CUDA graphs pay
    at every size; channels_last pays in the UNet at 512x512 and costs a little at 1024x1024, so the
    UNet keeps it (512x512 is the model's own size); it costs the VAE at every size, so the VAE stays
    contiguous; fused QKV projections measured no change and are not used. The VAE decodes a batch one
    image at a time: a lower peak memory (4 outputs at 1024x1024 in 16 GB).
    """

    def __init__(self, enabled: bool = True, compile: str = "off", cuda_graphs: bool = True,
                 cache_dir: Path | None = None, secret: str = "", max_shapes: int = MAX_SHAPES,
                 max_graph_positions: int = MAX_POSITIONS, max_kept_graph_bytes: int | None = None,
                 artifact: Path | None = None, artifact_trusted: bool = False, artifact_pin: str = "") -> None:
        """`artifact`: compiled parts shipped with the weights (artifact.py), used when `artifact_trusted`
        (baked into the image) or when its manifest's sha256 is `artifact_pin`."""
        self.enabled = enabled
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        self.cache_dir = cache_dir
        self.secret = secret
        self.max_shapes = max_shapes
        self.graph_limits = (max_graph_positions, max_kept_graph_bytes)
        self.compiler = Compiler() if enabled and compile != "off" else None
        self.parts: dict[str, FastPart] = {}  # "unet", "vae.decoder", "vae.encoder", as installed
        self.artifact = (artifact, artifact_trusted, artifact_pin)
        self.shipped: list[tuple[str, ShapeKey]] = []  # what the artifact holds, once installed
        self.vae_scale = 8  # latent side to pixel side: the installed pipeline's

    @classmethod
    def for_device(cls, device: torch.device, settings, artifact: Path | None = None,
                   artifact_trusted: bool = False) -> FastPath:
        """The deployment's fast path (config.Settings): on a GPU unless INPAINT_FAST_PATH=0; off on the CPU."""
        return cls(device.type == "cuda" and settings.fast_path, settings.compile, settings.cuda_graphs,
                   settings.compile_cache, settings.compile_cache_key, artifact=artifact,
                   artifact_trusted=artifact_trusted, artifact_pin=settings.compiled_manifest_sha256)

    def install(self, pipe) -> FastPath:
        """Apply the fast path to `pipe`'s modules (nothing when not enabled). On whatever device the
        pipeline is: the tests run it on the CPU, where graphs pass every call through."""
        if self.compiler is None and self.artifact[0] is not None:
            log.info("compiled parts shipped with the weights not used: %s", "INPAINT_COMPILE=off" if self.enabled else
                     "the fast path is off (no GPU here, or INPAINT_FAST_PATH=0)")
        if not self.enabled:
            return self
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.enable_slicing()
        self.vae_scale = pipe.vae_scale_factor
        if self.compiler is not None:
            self.cache_dir = usable_folder(self.cache_dir)  # one folder for every part (and the artifact's files)
            self._install_artifact(pipe.device)
        modules = {"unet": (pipe.unet, None), "vae.decoder": (pipe.vae.decoder, pipe.vae.config),
                   "vae.encoder": (pipe.vae.encoder, pipe.vae.config)}
        for part, (module, config) in modules.items():
            compiled = None
            if self.compiler is not None:
                compiled = CompiledPart(module, part, self.compiler, self.cache_dir, self.max_shapes, config, self.secret)
            graphs = Graphs(*self.graph_limits) if part == "unet" and self.cuda_graphs else None
            if compiled is None and graphs is None:
                continue
            stand_in = (UNetPart if part == "unet" else FastPart)(module, part, compiled, graphs)
            module.forward = stand_in
            self.parts[part] = stand_in
        return self

    def _install_artifact(self, device: torch.device) -> None:
        folder, trusted, pin = self.artifact
        if folder is None:
            if pin:
                log.warning("%s is set but the weights hold no compiled parts (%s/); predictions compile in the "
                            "background", shipped.PIN_SETTING, shipped.FOLDER)
            return
        try:
            self.shipped = shipped.install(folder, self.cache_dir, cachetrust.Seal(self.cache_dir, self.secret), device,
                                           trusted=trusted, pin=pin)
        except (shipped.ArtifactRefused, OSError, cachetrust.UntrustedCache) as error:  # refused, or not copied
            log.warning("compiled parts in %s not used: %s; predictions compile in the background instead", folder, error)
            return
        log.info("compiled parts shipped with the weights: %d, checked and copied into %s; setup loads those at "
                 "%dx%d, and the rest load after it", len(self.shipped), self.cache_dir, SETUP_SIZE, SETUP_SIZE)

    def load_shipped(self, timeout: float | None = None, size: int = SETUP_SIZE) -> bool:
        """Have the worker load every compiled part the artifact holds, and wait for those at `size`x`size`;
        False on timeout. The others are loaded after them, in the background: each is taken up by the first
        prediction that starts once it is ready. (Loads are not compiles: the limit of shapes per part does
        not apply.)"""
        if not self.shipped:
            return True
        start = time.perf_counter()
        now = [(part, key) for part, key in self.shipped if self.working_size(part, key) == (size, size)]
        later = [(part, key) for part, key in self.shipped if (part, key) not in now]
        for part, key in now:
            self.parts[part].compiled.request(key, over_limit=True)
        done = self.wait(timeout)
        missed = [describe(part, key) for part, key in now if self.parts[part].compiled.sources.get(key) != "loaded"]
        if missed:  # each says why in its own warning, or was compiled instead
            log.warning("of the %d shipped compiled parts at %dx%d, these were not loaded as shipped: %s", len(now), size,
                        size, ", ".join(missed))
        log.info("setup took up the %d shipped compiled parts at %dx%d in %.1f s%s", len(now), size, size,
                 time.perf_counter() - start, f"; the other {len(later)} load in the background" if later else "")
        for part, key in later:
            self.parts[part].compiled.request(key, over_limit=True)
        return done

    def working_size(self, part: str, key: ShapeKey) -> tuple[int, int]:
        """(width, height) of the predictions whose calls of `part` have `key`: its input's sides, in pixels."""
        height, width = key.shape[-2:]
        scale = self.vae_scale if PARTS[part].inputs == "latents" else 1
        return width * scale, height * scale

    @property
    def compiled_parts(self) -> list[CompiledPart]:
        """The compiled parts, the UNet first (empty when nothing is compiled)."""
        return [part.compiled for part in self.parts.values() if part.compiled is not None]

    def in_use(self) -> list[str]:
        """The compiled parts that calls run now, as the log names them ("UNet for latents 2x9x64x64", ...)."""
        return sorted(describe(part.part, key) for part in self.compiled_parts for key in list(part.adopted))

    @contextmanager
    def prediction(self) -> Iterator[None]:
        """Around one prediction: take up the compiled parts that are ready, in a turn of its own (turns.py):
        the worker's work in this process waits for it to end."""
        if self.compiler is None or not self.parts:
            yield
            return
        with self.compiler.turns.prediction():
            for part in self.compiled_parts:
                for key in part.adopt():
                    log.info("%s%s", TAKE_UP, describe(part.part, key))
            yield

    def turn(self, check: Callable[[], None] | None = None):
        """A request's whole turn on the device (generations and the safety check): the compile worker's work
        in this process waits for it to end (turns.py); `prediction()` within it takes no second turn.
        `check` is called while it waits (a cancellation raises). Nothing when nothing is compiled."""
        return self.compiler.turns.prediction(check) if self.compiler is not None and self.parts else nullcontext()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every part's compiles are done; False on timeout."""
        return all(part.wait(timeout) for part in self.compiled_parts)

    def release(self) -> None:
        """Drop every recorded CUDA graph and the memory it holds (after an out-of-memory error, say)."""
        for part in self.parts.values():
            if part.graphs is not None:
                part.graphs.clear()

    def warm_up(self, pipe, checker=None) -> None:
        """On a GPU: pay CUDA's first-use costs during setup (kernels loaded on first use, cuBLAS/cuDNN
        handles, the 512x512 UNet's CUDA graph; its first calls also ask the worker for the UNet and VAE
        at that shape). With compile="setup", wait for those and record the compiled UNet's graph too."""
        if not self.enabled or pipe.device.type != "cuda":
            return
        if checker is not None:
            checker.flags([Image.new("RGB", (224, 224))])
        self.load_shipped()
        warm_up(pipe, self)
        if self.compile == "setup" and self.compiled_parts:
            start = time.perf_counter()
            self.wait()
            log.info("setup waited %.1f s for the compiled UNet and VAE", time.perf_counter() - start)
            warm_up(pipe, self)  # records the compiled UNet's CUDA graph

    def stop(self) -> None:
        """End the compile worker and any compile it runs (also done at exit)."""
        if self.compiler is not None:
            self.compiler.stop()


def warm_up(pipe, fast: FastPath | None = None, size: int = SETUP_SIZE) -> float:
    """One short inpainting at `size`; returns its seconds."""
    from ..pipeline import Generation, generate

    start = time.perf_counter()
    image = Image.new("RGB", (size, size), (127, 127, 127))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    generate(pipe, [image], [mask], Generation("warm-up", None, 1, 2, 7.5, 1.0, "DPMSolverMultistep", 0), fast=fast)
    seconds = time.perf_counter() - start
    log.info("warm-up inpainting at %dx%d: %.1f s", size, size, seconds)
    return seconds
