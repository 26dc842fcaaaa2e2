"""Parts compiled by torch.compile in the background, so that nothing waits for them.

Compiled (Inductor's fused kernels), the UNet and the VAE run faster, but a compile takes tens of
seconds, again for every new working shape (bench/RESULTS.md, "Compiled"). So nothing waits for it
here. The first call of a part (the UNet, the VAE's encoder, its decoder) at a new shape runs
eagerly and asks the Compiler's worker thread for that part compiled for that shape; the worker
takes the UNet first (its 50 calls a prediction gain the most). The worker has a child process
compile it ahead of time (`torch.compile(...).aot_compile`: a function for exactly that shape, which
refuses other inputs instead of recompiling) and save it under `cache_dir`, loads it, runs it once
beside the eager part on the same random inputs, and hands it over only if the two agree. A
prediction takes up what is ready when it starts, never half-way, so each image comes from one set
of modules. The worker's work in this process (loading, checking, sealing) runs only between
predictions, in turns (turns.py): beside a prediction it would slow its stages down.

Saved compiled parts (with Inductor's own cache beside them) are keyed by GPU, versions, part,
config and shape, so a later start on the same kind of machine loads them instead of compiling. A
compile or load that fails leaves that part at that shape eager and says so once in the log.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import inspect
import io
import itertools
import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from .. import cachetrust
from ..config import REPO_ROOT
from ..stopwatch import Stopwatch
from .graphs import RETRY_AFTER_CALLS
from .keys import ShapeKey
from .turns import Turns

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    rank: int  # the worker's order, lowest first
    name: str  # as the log says it
    fixed: MappingProxyType  # the keyword inputs of its compiled calls
    inputs: str  # what its first input holds, as the log says it


# The parts that may be compiled. The VAE's encoder and decoder take one tensor and give one; the UNet's output is a tuple.
PARTS = MappingProxyType({
    "unet": Part(0, "UNet", MappingProxyType({"return_dict": False}), "latents"),
    "vae.decoder": Part(1, "VAE decoder", MappingProxyType({}), "latents"),
    "vae.encoder": Part(2, "VAE encoder", MappingProxyType({}), "images"),
})
# Working shapes that may get a compiled part in one process: each compile costs tens of seconds of a
# CPU core beside the predictions, so a stream of odd sizes must not keep the worker busy for good.
MAX_SHAPES = 8
# Largest relative difference (L2) from the eager part that a compiled one may show on the same inputs:
# fp16 rounding gives ~1e-3 (bench: final latents 1.9e-3 after 50 steps); a broken kernel gives ~1.
MAX_RELATIVE_ERROR = 2e-2
# Seconds a compile may take in the child process: far above the UNet's (bench/RESULTS.md, "Compiled").
COMPILE_TIMEOUT = 1200.0


def describe(part: str, key: ShapeKey) -> str:
    """As the log says it: "UNet for latents 2x9x64x64", "VAE encoder for images 1x3x512x512"."""
    return f"{PARTS[part].name} for {PARTS[part].inputs} {key}"


class Compiler:
    """The compile worker of one FastPath: one thread for all its parts, started at the first request and
    stopped at exit, because one compile at a time is what a server can afford beside its predictions.
    `turns` are taken by each prediction, and by the worker for each piece of its work in this process."""

    def __init__(self) -> None:
        self.turns = Turns()
        self.children: set[subprocess.Popen] = set()  # compile processes running now
        # (rank, order of asking, part, key); (-1, ...) stops the worker
        self._jobs: queue.PriorityQueue[tuple[int, int, CompiledPart | None, ShapeKey | None]] = queue.PriorityQueue()
        self._asked = itertools.count()
        self._worker: threading.Thread | None = None
        # Held to start the worker or a compile process, and by stop() to look at `children`: once it has
        # looked, neither starts again (it ends every child it saw).
        self._starting = threading.Lock()
        self._exiting = threading.Event()

    def submit(self, part: CompiledPart, key: ShapeKey) -> None:
        with self._starting:
            if self._exiting.is_set():
                return  # stopped: no worker starts again, and that job stays pending
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="compile-worker", daemon=True)
                self._worker.start()
                atexit.register(self.stop)
        self._jobs.put((PARTS[part.part].rank, next(self._asked), part, key))

    def _serve(self) -> None:
        while True:
            first = self._jobs.get()
            if first[2] is None:
                return
            self.turns.between()  # once the running prediction has asked for all it will: the most useful part first
            self._jobs.put(first)
            _, _, part, key = self._jobs.get()
            if part is None:
                return
            part.work(key)
            del first, part  # nothing of a finished job stays alive here

    def stop(self, timeout: float = 10.0) -> None:
        """At exit, or when its FastPath is done with: end a compile still running (nothing would load it),
        and let the worker end."""
        atexit.unregister(self.stop)  # nothing left for exit to do, and this compiler may be freed
        with self._starting:
            self._exiting.set()
            children = list(self.children)
        self._jobs.put((-1, next(self._asked), None, None))
        for child in children:
            child.kill()
        if self._worker is not None:
            self._worker.join(timeout)

    def compile_in_child(self, part: CompiledPart, key: ShapeKey, path: Path) -> None:
        """Compile `part` for `key` in a fresh interpreter that saves it at `path`.

        Not in this process: compiling traces modules with torch.fx, which patches torch.nn.Module.__call__
        for every thread while it runs, so a prediction running beside it fails ("module is not installed
        as a submodule", reproduced on the CPU); the child runs at a lower CPU priority, has its own GIL,
        and a crash there costs only the compile. It builds its own part from the config with uninitialised
        weights: the compiled code depends on the shapes, dtypes and layout, not on the values."""
        module = part.module
        parameter = next(module.parameters())
        command = [
            sys.executable, "-m", "inpaint.fastpath.compiler", "--part", part.part,
            "--config", json.dumps(part.config, default=str), "--dtype", str(parameter.dtype),
            "--device", str(parameter.device), "--key", key.to_json(), "--out", str(path), "--parent", str(os.getpid()),
        ]
        if module.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
            command.append("--channels-last")
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        with self._starting:
            if self._exiting.is_set():
                raise RuntimeError("no compile process was started: this process is exiting")
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                                     cwd=REPO_ROOT)
            self.children.add(child)  # ended by stop() if the process exits first
        with child:
            try:
                _, stderr = child.communicate(timeout=COMPILE_TIMEOUT)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                raise RuntimeError(f"the compile process took longer than {COMPILE_TIMEOUT:g} s and was stopped") from None
            finally:
                self.children.discard(child)
        if self._exiting.is_set():
            raise RuntimeError("the compile process was stopped: this process is exiting")
        if child.returncode != 0 or not path.is_file():
            lines = [line for line in stderr.splitlines() if line.strip()]
            raise RuntimeError(f"the compile process ended with code {child.returncode}: {lines[-1] if lines else 'no message'}")


class CompiledPart:
    """One part's compiled functions, one per ShapeKey: asked for, compiled or loaded by the Compiler,
    checked against the eager part, and taken up (`adopt`) by the next prediction."""

    def __init__(self, module: torch.nn.Module, part: str, compiler: Compiler, cache_dir: Path | None = None,
                 max_shapes: int = MAX_SHAPES, config: dict | None = None, secret: str = "") -> None:
        if part not in PARTS:
            raise ValueError(f"part {part!r} must be one of {', '.join(PARTS)}")
        self.module = module
        self.part = part
        self.compiler = compiler
        # What the child builds the part from; not where it was loaded from, which would key the saved parts
        # to a folder (a shipped artifact is built from another one).
        self.config = {name: value for name, value in (module.config if config is None else config).items()
                       if name != "_name_or_path"}
        self.fixed = PARTS[part].fixed
        self.eager = module.forward
        self.cache_dir = usable_folder(cache_dir)
        self.seal = cachetrust.Seal(self.cache_dir, secret)  # what is saved here is code: sealed, and checked on load
        self.max_shapes = max_shapes
        self.adopted: dict[ShapeKey, Any] = {}  # what calls use; changed only by adopt(), reject() and its retry
        self.set_aside: dict[ShapeKey, list] = {}  # rejected: [function, calls left before it is tried again]
        self.ready: dict[ShapeKey, Any] = {}  # handed over by the worker, adopted at the next prediction
        self.requested: set[ShapeKey] = set()
        self.seconds: dict[ShapeKey, float] = {}  # how long each shape took to compile or load
        self.sources: dict[ShapeKey, str] = {}  # "compiled", "loaded" (from cache_dir) or "failed"
        self._state = threading.Lock()
        self._pending = 0
        self._idle = threading.Condition(self._state)
        _keep_inductor_cache_in(self.cache_dir / "inductor", self.seal)

    def function(self, key: ShapeKey):
        """The compiled function taken up for calls of `key`, or None (and, at a key not yet asked for,
        the worker is asked for it)."""
        compiled = self.adopted.get(key)
        if compiled is None:
            if key in self.set_aside:
                return self._retry(key)
            self.request(key)
        return compiled

    def reject(self, key: ShapeKey, retry_after_calls: int = RETRY_AFTER_CALLS) -> None:
        """Stop using the compiled part for calls of `key` for a while (its CUDA graph could not be
        recorded, say): that shape runs uncompiled for the next `retry_after_calls` calls, then the
        compiled part is handed over again for the next prediction to take up, since the cause may
        pass (memory held by a neighbour)."""
        with self._state:
            adopted, ready = self.adopted.pop(key, None), self.ready.pop(key, None)
            compiled = adopted if adopted is not None else ready
            if compiled is not None:
                self.set_aside[key] = [compiled, retry_after_calls]

    def _retry(self, key: ShapeKey) -> None:
        """A call of a set-aside key, which runs uncompiled; the last one of its wait hands the compiled
        function over again (taken up by the next prediction, never half-way through one)."""
        with self._state:
            entry = self.set_aside.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self.set_aside[key]
            self.ready[key] = entry[0]
        log.info("the compiled %s is handed over again, after its CUDA graph failed", describe(self.part, key))

    def request(self, key: ShapeKey, over_limit: bool = False) -> None:
        """Have the worker compile (or load) this part for calls of `key`, once; beyond `max_shapes` keys
        only when `over_limit` (a shipped part, which is loaded, not compiled)."""
        with self._state:
            if key in self.requested or (len(self.requested) >= self.max_shapes and not over_limit):
                return
            self.requested.add(key)
            self._pending += 1
        self.compiler.submit(self, key)

    def adopt(self) -> list[ShapeKey]:
        """Take up the compiled functions the worker has finished; returns their keys."""
        with self._state:
            keys = list(self.ready)
            self.adopted.update(self.ready)
            self.ready.clear()
        return keys

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker has nothing left to do for this part; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def work(self, key: ShapeKey) -> None:
        """The worker's job for one shape: a compiled function in `ready`, or a warning and that shape eager."""
        watch = Stopwatch()
        try:
            with watch.time("obtain"):
                compiled, how = self._obtain(key)
        except Exception as error:  # that shape stays eager; the server goes on
            # The text, not the exception: a handler that keeps records (pytest's does) would keep its
            # traceback's frames alive, with their tensors and this part.
            log.warning("compiled %s not available (%s: %s); that shape runs uncompiled",
                        describe(self.part, key), type(error).__name__, str(error))
            compiled, how = None, "failed"
        with self._state:
            self.sources[key] = how
            if compiled is not None:
                self.seconds[key] = watch.read()["obtain"]
                self.ready[key] = compiled
                log.info("%s %s in %.1f s; predictions use it from the next one", describe(self.part, key), how,
                         self.seconds[key])
            self._pending -= 1
            self._idle.notify_all()

    def _obtain(self, key: ShapeKey) -> tuple[Any, str]:
        """Load the compiled part for `key` from the cache, else compile it in a child process and load
        that; check it against the eager part."""
        path = self.path(key)
        # Guards are built and checked under the calls' own mode. On a GPU the worker's own work goes on
        # a stream of its own: on the default stream it would wait for, and break, a CUDA graph that a
        # prediction is recording at the same moment.
        stream = torch.cuda.stream(torch.cuda.Stream(key.device)) if key.device.startswith("cuda") else nullcontext()
        turn = self.compiler.turns.worker
        with torch.inference_mode(key.inference), stream:
            compiled, how = None, "loaded"
            if path.exists():
                with turn():
                    try:
                        compiled = self.load(path)
                    except Exception as error:
                        aside = cachetrust.move_aside(path)
                        log.warning("saved compiled %s %s not loaded (%s: %s); moved aside to %s, compiling it again",
                                    PARTS[self.part].name, path.name, type(error).__name__, str(error), aside.name)
                    if compiled is not None:
                        self._check(compiled, key)
                        _seal_inductor_cache(self.seal)
                        return compiled, how
            self.compiler.compile_in_child(self, key, path)  # in another process: no turn
            with turn():
                self.seal.seal(path)
                compiled = self.load(path)
                self._check(compiled, key)
                _seal_inductor_cache(self.seal)
        return compiled, "compiled"

    def load(self, path: Path):
        """Unpickle a saved part from bytes whose seal checks out (cachetrust.UntrustedCache otherwise)."""
        data = self.seal.read(path)
        return torch.compiler.load_compiled_function(io.BytesIO(data), external_data=_external(self.module))

    def _check(self, compiled, key: ShapeKey) -> None:
        """Run the compiled and the eager part on the same random inputs; refuse the compiled one if they
        differ (in the worker's turn: see _obtain)."""
        inputs = key.example()
        if not compiled.guard_check(self.module, *inputs, **self.fixed):
            raise RuntimeError("its guards refuse the inputs it was made for")
        ours = first(compiled(self.module, *inputs, **self.fixed))
        eager = first(self.eager(*inputs, **self.fixed))
        error = relative_error(ours, eager)
        del inputs, ours, eager
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what this check used stays cached for the worker's stream otherwise
        if not error <= MAX_RELATIVE_ERROR:
            raise RuntimeError(f"it differs from the eager {PARTS[self.part].name} by {error:.2e} (relative L2; at most "
                               f"{MAX_RELATIVE_ERROR} allowed)")

    def path(self, key: ShapeKey) -> Path:
        """Where the compiled part for calls of `key` is saved, in this process's environment (_environment)."""
        digest = hashlib.sha256(json.dumps([_environment(self), key.to_json()]).encode()).hexdigest()[:20]
        return self.cache_dir / f"{self.part.replace('.', '-')}-{digest}.aot"


def aot_compile(module: torch.nn.Module, part: str, key: ShapeKey, backend: str = "inductor"):
    """A compiled `part` for calls of `key` (torch 2.11's ahead-of-time compile: it refuses other inputs
    rather than compiling again). Called in the child process, under the calls' inference mode. (The fast
    tests pass dynamo's "eager" backend: the same traced function and guards in seconds, without Inductor.)"""
    import torch._dynamo

    torch._dynamo.config.enable_aot_compile = True
    function = torch.compile(
        type(module).forward,
        fullgraph=True,
        dynamic=False,
        backend=backend,
        # guards on the inputs' shapes, strides and dtypes and on grad mode; not on the module's
        # identity, which cannot be saved (the same module object is passed at every call)
        options={"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe},
    )
    return function.aot_compile(((module, *key.example()), dict(PARTS[part].fixed)))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative L2 distance of `ours` from `reference`, in float32 (0.0 when identical)."""
    reference = reference.float()
    return float((ours.float() - reference).norm() / reference.norm().clamp_min(1e-12))


def first(output):
    """The tensor of a part's output (the UNet's comes in a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def _environment(part: CompiledPart) -> list:
    """What a saved compiled part depends on besides the call: versions, the device, the part, its config and layout."""
    import diffusers

    module = part.module
    parameter = next(module.parameters())
    device = parameter.device
    gpu = [torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)] if device.type == "cuda" else []
    layout = [conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in (module.conv_in, module.conv_out)]
    return [torch.__version__, diffusers.__version__, str(device.type), gpu, str(parameter.dtype), layout, part.part,
            json.dumps(part.config, sort_keys=True, default=str)]


def _external(module: torch.nn.Module) -> dict[str, Any]:
    """The functions a saved compiled part refers to, which are passed in again when it is loaded
    (diffusers wraps UNet2DConditionModel.forward in a decorator; the original cannot be pickled by name)."""
    forward = type(module).forward
    return {"forward": forward, "forward.inner": inspect.unwrap(forward)}


def usable_folder(folder: Path | None) -> Path:
    """`folder`, made 0700 if needed, when it is this user's own and private (cachetrust) and writable;
    else a private temporary folder (the compiled parts then last as long as this process)."""
    if folder is not None:
        try:
            cachetrust.private_folder(folder)
            with tempfile.TemporaryFile(dir=folder):
                return folder
        except (OSError, cachetrust.UntrustedCache) as error:
            log.warning("compiled parts cannot be kept in %s (%s); they are kept for this process only", folder, error)
    return Path(tempfile.mkdtemp(prefix="inpaint-compiled-"))


def _keep_inductor_cache_in(folder: Path, seal: cachetrust.Seal) -> None:
    """Inductor's kernels and autotuning results, kept beside the compiled functions that use them (a
    loaded function whose kernels are not in this cache builds them again), once its seal checks out;
    otherwise it is moved aside and a new one starts empty. A folder the deployment chose with
    TORCHINDUCTOR_CACHE_DIR is left as it is; torch sets its own default in /tmp on import."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") not in (None, "", default_cache_dir()):  # set empty: not chosen
        return
    if folder.exists():
        try:
            seal.check_tree(folder)
        except cachetrust.UntrustedCache as error:
            aside = cachetrust.move_aside(folder)
            log.warning("Inductor's cache %s not used (%s); moved aside to %s, starting an empty one", folder, error, aside.name)
    cachetrust.private_folder(folder)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def _seal_inductor_cache(seal: cachetrust.Seal) -> None:
    """Sign Inductor's cache as it is after a compile or a load (its folder when this process chose it)."""
    folder = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""))  # unset or empty: ".", never the seal's
    if folder.parent == seal.folder and folder.is_dir():
        seal.seal_tree(folder)


def _save(compiled, path: Path, module: torch.nn.Module) -> None:
    """Write atomically, through a file of mkstemp's (a unique name even on a volume shared between
    containers): a reader sees the whole file or none."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.partial-")
    os.close(descriptor)
    try:
        compiled.save_compiled_function(partial, external_data=_external(module))
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    """The child process of Compiler.compile_in_child: build the part, compile it for one key, save it."""
    import argparse

    parser = argparse.ArgumentParser(description="Compile the UNet or a part of the VAE for one working shape and save it.")
    parser.add_argument("--part", choices=list(PARTS), default="unet")
    parser.add_argument("--config", required=True, help="the config (UNet's or VAE's) as JSON")
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--key", required=True, help="ShapeKey.to_json()")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--parent", type=int, help="the server's process id: this one ends when that one does")
    args = parser.parse_args(argv)
    if args.parent is not None:
        _exit_with_parent(args.parent)
    os.nice(10)  # the server's predictions come first
    # A process that ends after one compile: no cyclic garbage collection over the many objects tracing
    # and lowering make (thousands of collections otherwise, for a little more memory at the peak).
    gc.disable()
    key = ShapeKey.from_json(args.key)
    with torch.device("meta"):  # no weights read or initialised: their values do not matter here
        module = _build(args.part, json.loads(args.config)).to(getattr(torch, args.dtype.removeprefix("torch."))).eval()
    module = module.to_empty(device=args.device)
    if args.channels_last:
        module.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode(key.inference):
        compiled = aot_compile(module, args.part, key)
    _save(compiled, args.out, module)
    print(f"compiled the {describe(args.part, key)} in {time.perf_counter() - start:.1f} s: {args.out}")
    return 0


def _build(part: str, config: dict) -> torch.nn.Module:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if part == "unet":
        return UNet2DConditionModel.from_config(config)
    return getattr(AutoencoderKL.from_config(config), part.removeprefix("vae."))


def _exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """End this process soon after the server that started it is gone (stopped mid-compile, say): a
    compile nobody will load would only keep a GPU's memory and a CPU core from what runs next. (An
    orphan is handed to another parent; `parent` is given, not read here, in case that happened
    before this process got this far.)"""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
