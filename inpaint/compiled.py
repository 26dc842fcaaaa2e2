"""The UNet and the VAE compiled by torch.compile in the background, so that nothing waits for them.

Compiled (Inductor's fused kernels), the UNet and the VAE run faster, but a compile takes tens of
seconds, again for every new working shape (bench/RESULTS.md, "Compiled"). So nothing waits for it
here. The first call of a part (the UNet, the VAE's encoder, its decoder) at a
new shape runs eagerly and asks the worker thread for that part compiled for that shape; the worker
takes the UNet first (its 50 calls a prediction gain the most). The worker has a child process
compile it ahead of time (`torch.compile(...).aot_compile`: a function for exactly that shape, which
refuses other inputs instead of recompiling) and save it under `cache_dir`, loads it, runs it once
beside the eager part on the same random inputs, and hands it over only if the two agree. A
prediction takes up what is ready when it starts, never half-way, so each image comes from one set
of modules. The worker runs GPU work only between predictions (`prediction` holds it off).

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
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from . import cachetrust
from .config import REPO_ROOT
from .cudagraphs import plain_kwargs, unet_output

log = logging.getLogger(__name__)

# The parts that may be compiled: the worker's order (lowest first) and the keyword inputs of their compiled
# calls. The VAE's encoder and decoder take one tensor and give one; the UNet's output is a tuple.
PARTS = {"unet": (0, {"return_dict": False}), "vae.decoder": (1, {}), "vae.encoder": (2, {})}
# Working shapes that may get a compiled part in one process: each compile costs tens of seconds of a
# CPU core beside the predictions, so a stream of odd sizes must not keep the worker busy for good.
MAX_SHAPES = 8
# Largest relative difference (L2) from the eager part that a compiled one may show on the same inputs:
# fp16 rounding gives ~1e-3 (bench: final latents 1.9e-3 after 50 steps); a broken kernel gives ~1.
MAX_RELATIVE_ERROR = 2e-2
# Seconds a compile may take in the child process: far above the UNet's (bench/RESULTS.md, "Compiled").
COMPILE_TIMEOUT = 1200.0


class CompiledForward:
    """Stands in for a part's `forward` (install with `use_compiled`): tensors in, the same result out.

    As is, for the VAE's encoder and decoder (one tensor in, one out); CompiledUNet has the UNet's call."""

    def __init__(self, module: torch.nn.Module, part: str, cache_dir: Path | None = None, max_shapes: int = MAX_SHAPES,
                 config: dict | None = None, secret: str = "") -> None:
        if part not in PARTS:
            raise ValueError(f"part {part!r} must be one of {', '.join(PARTS)}")
        self.module = module
        self.part = part
        self.config = dict(module.config if config is None else config)  # what the child builds the part from
        self.fixed = PARTS[part][1]
        self.eager = module.forward
        self.cache_dir = _usable(cache_dir)
        self.seal = cachetrust.Seal(self.cache_dir, secret)  # what is saved here is code: sealed, and checked on load
        self.max_shapes = max_shapes
        self.adopted: dict[tuple, Any] = {}  # what calls use; changed only by adopt()
        self.ready: dict[tuple, Any] = {}  # handed over by the worker, adopted at the next prediction
        self.requested: set[tuple] = set()
        self.seconds: dict[tuple, float] = {}  # how long each shape took to compile or load
        self.sources: dict[tuple, str] = {}  # "compiled", "loaded" (from cache_dir) or "failed"
        self._state = threading.Lock()
        self._pending = 0
        self._idle = threading.Condition(self._state)
        _keep_inductor_cache_in(self.cache_dir / "inductor", self.seal)

    def __call__(self, *args: Any, **kwargs: Any):
        if args and plain_kwargs(kwargs):
            output = self._compiled(args)
            if output is not None:
                return output
        return self.eager(*args, **kwargs)

    def _compiled(self, inputs: tuple) -> Any | None:
        """The compiled part's output for these inputs, or None: run the eager one (and, at a shape not yet
        asked for, ask the worker for it)."""
        if not _inference_call(*inputs):
            return None
        key = call_key(*inputs)
        compiled = self.adopted.get(key)
        if compiled is None:
            self.request(key)
            return None
        if not compiled.guard_check(self.module, *inputs, **self.fixed):
            return None
        return compiled(self.module, *inputs, **self.fixed)

    def tag(self, *inputs) -> bool:
        """True when a call with these inputs runs compiled (cudagraphs records each kind apart)."""
        return (bool(self.adopted)  # nothing taken up yet: no key to build on every step
                and _inference_call(*inputs)
                and call_key(*inputs) in self.adopted)

    def reject(self, *inputs) -> None:
        """Stop using the compiled part for calls like these (its CUDA graph could not be recorded, say);
        that shape runs uncompiled from then on and is not compiled again."""
        key = call_key(*inputs)
        with self._state:
            self.adopted.pop(key, None)
            self.ready.pop(key, None)
            self.sources[key] = "failed"

    def request(self, key: tuple) -> None:
        """Have the worker compile (or load) this part for calls of `key`, once."""
        with self._state:
            if key in self.requested or len(self.requested) >= self.max_shapes:
                return
            self.requested.add(key)
            self._pending += 1
        _submit(self, key)

    def adopt(self) -> list[tuple]:
        """Take up the compiled functions the worker has finished; returns their keys."""
        with self._state:
            keys = list(self.ready)
            self.adopted.update(self.ready)
            self.ready.clear()
        return keys

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker has nothing left to do; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _work(self, key: tuple) -> None:
        """The worker's job for one shape: a compiled function in `ready`, or a warning and that shape eager."""
        start = time.perf_counter()
        try:
            compiled, how = self._obtain(key)
        except Exception as error:  # that shape stays eager; the server goes on
            log.warning("compiled %s not available (%s: %s); that shape runs uncompiled",
                        _describe(self.part, key), type(error).__name__, error)
            compiled, how = None, "failed"
        with self._state:
            self.sources[key] = how
            if compiled is not None:
                self.seconds[key] = time.perf_counter() - start
                self.ready[key] = compiled
                log.info("%s %s in %.1f s; predictions use it from the next one",
                         _describe(self.part, key), how, self.seconds[key])
            self._pending -= 1
            self._idle.notify_all()

    def _obtain(self, key: tuple) -> tuple[Any, str]:
        """Load the compiled part for `key` from the cache, else compile it in a child process and load
        that; check it against the eager part."""
        inference, device = key[-1], key[0][3]
        path = self._path(key)
        # Guards are built and checked under the calls' own mode. On a GPU the worker's own work goes on
        # a stream of its own: on the default stream it would wait for, and break, a CUDA graph that a
        # prediction is recording at the same moment.
        stream = torch.cuda.stream(torch.cuda.Stream(device)) if device.startswith("cuda") else nullcontext()
        with torch.inference_mode(inference), stream:
            compiled, how = None, "loaded"
            if path.exists():
                try:
                    compiled = self._load(path)
                except Exception as error:
                    aside = cachetrust.move_aside(path)
                    log.warning("saved compiled %s %s not loaded (%s: %s); moved aside to %s, compiling it again",
                                _NAMES[self.part], path.name, type(error).__name__, error, aside.name)
            if compiled is None:
                _compile_in_child(self, key, path)
                self.seal.seal(path)
                compiled, how = self._load(path), "compiled"
            self._check(compiled, key)
            _seal_inductor_cache(self.seal)
        return compiled, how

    def _load(self, path: Path):
        """Unpickle a saved part from bytes whose seal checks out (cachetrust.UntrustedCache otherwise)."""
        data = self.seal.read(path)
        return torch.compiler.load_compiled_function(io.BytesIO(data), external_data=_external(self.module))

    def _check(self, compiled, key: tuple) -> None:
        """Run the compiled and the eager part on the same random inputs; refuse the compiled one if they differ."""
        with _gpu:
            inputs = _example(key)
            if not compiled.guard_check(self.module, *inputs, **self.fixed):
                raise RuntimeError("its guards refuse the inputs it was made for")
            ours = _first(compiled(self.module, *inputs, **self.fixed))
            eager = _first(self.eager(*inputs, **self.fixed))
            error = float((ours.float() - eager.float()).norm() / eager.float().norm().clamp_min(1e-12))
            del inputs, ours, eager
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # what this check used stays cached for the worker's stream otherwise
        if not error <= MAX_RELATIVE_ERROR:
            raise RuntimeError(f"it differs from the eager {_NAMES[self.part]} by {error:.2e} (relative L2; at most "
                               f"{MAX_RELATIVE_ERROR} allowed)")

    def _path(self, key: tuple) -> Path:
        digest = hashlib.sha256(json.dumps([_environment(self), repr(key)]).encode()).hexdigest()[:20]
        return self.cache_dir / f"{self.part.replace('.', '-')}-{digest}.aot"


class CompiledUNet(CompiledForward):
    """Stands in for `unet.forward`: the UNet's own call (its output a tuple or a UNet2DConditionOutput)."""

    def __init__(self, unet: torch.nn.Module, cache_dir: Path | None = None, max_shapes: int = MAX_SHAPES,
                 secret: str = "") -> None:
        super().__init__(unet, "unet", cache_dir, max_shapes, secret=secret)

    def __call__(self, sample, timestep, encoder_hidden_states, *args: Any, return_dict: bool = True, **kwargs: Any):
        if not args and plain_kwargs(kwargs):
            output = self._compiled((sample, timestep, encoder_hidden_states))
            if output is not None:
                return (output[0],) if not return_dict else unet_output(output[0])
        return self.eager(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)


# One worker thread per process, for every CompiledForward, alive until the process exits (stopped at
# exit): one compile at a time is what a server can afford beside its predictions. Its jobs are
# (rank, order of asking, part, key), the part's rank from PARTS; (-1, ...) stops it.
_jobs: queue.PriorityQueue[tuple[int, int, CompiledForward | None, tuple | None]] = queue.PriorityQueue()
_asked = itertools.count()
_gpu = threading.Lock()  # held by a prediction, or by the worker while it runs a part on the GPU
_worker: threading.Thread | None = None
_worker_lock = threading.Lock()
_children: set[subprocess.Popen] = set()  # compile processes running now
_exiting = threading.Event()


def _submit(forward: CompiledForward, key: tuple) -> None:
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = threading.Thread(target=_serve, name="compile-worker", daemon=True)
            _worker.start()
            atexit.register(_stop)
    _jobs.put((PARTS[forward.part][0], next(_asked), forward, key))


def _serve() -> None:
    while True:
        first = _jobs.get()
        with _gpu:  # once the running prediction has asked for all it will: the most useful part first
            _jobs.put(first)
            _, _, forward, key = _jobs.get()
        if forward is None:
            return
        forward._work(key)
        del first, forward  # nothing of a finished job stays alive here


def _stop(timeout: float = 10.0) -> None:
    """At exit: end a compile still running (nothing would load it), and let the worker end."""
    _exiting.set()
    _jobs.put((-1, next(_asked), None, None))
    for child in list(_children):
        child.kill()
    if _worker is not None:
        _worker.join(timeout)


def _compile_in_child(forward: CompiledForward, key: tuple, path: Path) -> None:
    """Compile the part for `key` in a fresh interpreter that saves it at `path`.

    Not in this process: compiling traces modules with torch.fx, which patches torch.nn.Module.__call__
    for every thread while it runs, so a prediction running beside it fails ("module is not installed
    as a submodule", reproduced on the CPU); the child runs at a lower CPU priority, has its own GIL,
    and a crash there costs only the compile. It builds its own part from the config with uninitialised
    weights: the compiled code depends on the shapes, dtypes and layout, not on the values."""
    module = forward.module
    parameter = next(module.parameters())
    command = [
        sys.executable, "-m", "inpaint.compiled", "--part", forward.part,
        "--config", json.dumps(forward.config, default=str), "--dtype", str(parameter.dtype),
        "--device", str(parameter.device), "--key", json.dumps(key), "--out", str(path), "--parent", str(os.getpid()),
    ]
    if module.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
        command.append("--channels-last")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                          cwd=REPO_ROOT) as child:
        _children.add(child)  # ended by _stop if the process exits first
        try:
            _, stderr = child.communicate(timeout=COMPILE_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise RuntimeError(f"the compile process took longer than {COMPILE_TIMEOUT:g} s and was stopped") from None
        finally:
            _children.discard(child)
    if _exiting.is_set():
        raise RuntimeError("the compile process was stopped: this process is exiting")
    if child.returncode != 0 or not path.is_file():
        lines = [line for line in stderr.splitlines() if line.strip()]
        raise RuntimeError(f"the compile process ended with code {child.returncode}: {lines[-1] if lines else 'no message'}")


def aot_compile(module: torch.nn.Module, part: str, key: tuple):
    """A compiled `part` for calls of `key` (torch 2.11's ahead-of-time compile: it refuses other inputs
    rather than compiling again). Called in the child process, under the calls' inference mode."""
    import torch._dynamo

    torch._dynamo.config.enable_aot_compile = True
    function = torch.compile(
        type(module).forward,
        fullgraph=True,
        dynamic=False,
        # guards on the inputs' shapes, strides and dtypes and on grad mode; not on the module's
        # identity, which cannot be saved (the same module object is passed at every call)
        options={"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe},
    )
    return function.aot_compile(((module, *_example(key)), PARTS[part][1]))


def call_key(*inputs: torch.Tensor) -> tuple:
    """What a compiled part is specialised to: each input's shape, strides, dtype and device, and inference mode."""
    return (*((tuple(value.shape), value.stride(), str(value.dtype), str(value.device)) for value in inputs),
            torch.is_inference_mode_enabled())


def _example(key: tuple) -> tuple[torch.Tensor, ...]:
    """Random inputs of the kind `key` describes (made under the mode the caller set); whole numbers (the
    UNet's timestep) are 500."""
    inputs = []
    for shape, stride, dtype, device in key[:-1]:
        value = torch.empty_strided(shape, stride, dtype=_dtype(dtype), device=device)
        inputs.append(value.normal_() if value.is_floating_point() else value.fill_(500))
    return tuple(inputs)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _shape(key: tuple) -> str:
    return "x".join(map(str, key[0][0]))


_NAMES = {"unet": "UNet", "vae.encoder": "VAE encoder", "vae.decoder": "VAE decoder"}


def _describe(part: str, key: tuple) -> str:
    """As the log says it: "UNet for latents 2x9x64x64", "VAE encoder for images 1x3x512x512"."""
    return f"{_NAMES[part]} for {'images' if part == 'vae.encoder' else 'latents'} {_shape(key)}"


def _first(output):
    """The tensor of a part's output (the UNet's comes in a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def _environment(forward: CompiledForward) -> list:
    """What a saved compiled part depends on besides the call: versions, the device, the part, its config and layout."""
    import diffusers

    module = forward.module
    parameter = next(module.parameters())
    device = parameter.device
    gpu = [torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)] if device.type == "cuda" else []
    layout = [conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in (module.conv_in, module.conv_out)]
    return [torch.__version__, diffusers.__version__, str(device.type), gpu, str(parameter.dtype), layout, forward.part,
            json.dumps(forward.config, sort_keys=True, default=str)]


def _external(module: torch.nn.Module) -> dict[str, Any]:
    """The functions a saved compiled part refers to, which are passed in again when it is loaded
    (diffusers wraps UNet2DConditionModel.forward in a decorator; the original cannot be pickled by name)."""
    forward = type(module).forward
    return {"forward": forward, "forward.inner": inspect.unwrap(forward)}


def _usable(folder: Path | None) -> Path:
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

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) != default_cache_dir():
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
    folder = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""))
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


def _inference_call(*values) -> bool:
    return all(isinstance(value, torch.Tensor) for value in values) and not torch.is_grad_enabled()


def use_compiled(module: torch.nn.Module, cache_dir: Path | None = None, part: str = "unet", config: dict | None = None,
                 secret: str = "", **limits: int) -> CompiledForward:
    """Route `module(...)` through a CompiledForward (the module, its config and weights stay as they are).
    `part` says which (PARTS); the VAE's parts take the VAE's `config`, which the child builds them from.
    `secret` keys the seals of what is saved in `cache_dir` (cachetrust)."""
    if part == "unet":
        compiled = CompiledUNet(module, cache_dir, secret=secret, **limits)
    else:
        compiled = CompiledForward(module, part, cache_dir, config=config, secret=secret, **limits)
    module.forward = compiled
    return compiled


def of(module: torch.nn.Module) -> CompiledForward | None:
    """The CompiledForward under `module.forward` (beneath the CUDA graphs, say), if there is one."""
    forward = vars(module).get("forward")
    while forward is not None and not isinstance(forward, CompiledForward):
        forward = getattr(forward, "eager", None)
    return forward


@contextmanager
def prediction(*modules: torch.nn.Module):
    """Around one prediction: take up the compiled parts of `modules` that are ready, and keep the worker
    off the GPU."""
    forwards = [forward for forward in map(of, modules) if forward is not None]
    with _gpu if forwards else nullcontext():
        for forward in forwards:
            for key in forward.adopt():
                log.info("this prediction uses the compiled %s", _describe(forward.part, key))
        yield


def main(argv: list[str] | None = None) -> int:
    """The child process of _compile_in_child: build the part, compile it for one key, save it."""
    import argparse

    parser = argparse.ArgumentParser(description="Compile the UNet or a part of the VAE for one working shape and save it.")
    parser.add_argument("--part", choices=list(PARTS), default="unet")
    parser.add_argument("--config", required=True, help="the config (UNet's or VAE's) as JSON")
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--key", required=True, help="call_key() as JSON")
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
    key = _key_from_json(json.loads(args.key))
    with torch.device("meta"):  # no weights read or initialised: their values do not matter here
        module = _build(args.part, json.loads(args.config)).to(_dtype(args.dtype)).eval()
    module = module.to_empty(device=args.device)
    if args.channels_last:
        module.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode(key[-1]):
        compiled = aot_compile(module, args.part, key)
    _save(compiled, args.out, module)
    print(f"compiled the {_describe(args.part, key)} in {time.perf_counter() - start:.1f} s: {args.out}")
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


def _key_from_json(value):
    """call_key's tuple back from JSON, where its tuples became lists."""
    return tuple(_key_from_json(item) for item in value) if isinstance(value, list) else value


if __name__ == "__main__":
    sys.exit(main())
