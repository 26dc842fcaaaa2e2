"""The UNet compiled by torch.compile in the background, so that neither setup nor a prediction waits for it.

Compiled (Inductor's fused kernels), a 512x512 prediction on an H100 took 403 ms instead of 591 ms,
but compiling took 40-56 s, and again for every new working shape (bench/RESULTS.md). So nothing
waits for it here. The first call at a new shape runs eagerly and asks the worker thread for a UNet
compiled for that shape. The worker has a child process compile it ahead of time
(`torch.compile(...).aot_compile`: a function for exactly that shape, which refuses other inputs
instead of recompiling) and save it under `cache_dir`, loads it, runs it once beside the eager UNet
on the same random inputs, and hands it over only if the two agree. A prediction takes up what is
ready when it starts, never half-way, so each image comes from one UNet. The worker runs GPU work
only between predictions (`prediction` holds it off).

Saved compiled UNets (with Inductor's own cache beside them) are keyed by GPU, versions, UNet config
and shape, so a later start on the same kind of machine loads them instead of compiling. A compile
or load that fails leaves that shape eager and says so once in the log.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import inspect
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

from .config import REPO_ROOT
from .cudagraphs import plain_kwargs, unet_output

log = logging.getLogger(__name__)

# Working shapes that may get a compiled UNet in one process: each compile costs tens of seconds of a
# CPU core beside the predictions, so a stream of odd sizes must not keep the worker busy for good.
MAX_SHAPES = 8
# Largest relative difference (L2) from the eager UNet that a compiled one may show on the same inputs:
# fp16 rounding gives ~1e-3 (bench: final latents 1.9e-3 after 50 steps); a broken kernel gives ~1.
MAX_RELATIVE_ERROR = 2e-2
# Seconds a compile may take in the child process (40-56 s for the 512x512 UNet on an H100).
COMPILE_TIMEOUT = 1200.0


class CompiledForward:
    """Stands in for `unet.forward` (install with `use_compiled`); same arguments, same results."""

    def __init__(self, unet: torch.nn.Module, cache_dir: Path | None = None, max_shapes: int = MAX_SHAPES) -> None:
        self.unet = unet
        self.eager = unet.forward
        self.cache_dir = _usable(cache_dir)
        self.max_shapes = max_shapes
        self.adopted: dict[tuple, Any] = {}  # what calls use; changed only by adopt()
        self.ready: dict[tuple, Any] = {}  # handed over by the worker, adopted at the next prediction
        self.requested: set[tuple] = set()
        self.seconds: dict[tuple, float] = {}  # how long each shape took to compile or load
        self.sources: dict[tuple, str] = {}  # "compiled", "loaded" (from cache_dir) or "failed"
        self._state = threading.Lock()
        self._gpu = threading.Lock()  # held by a prediction, or by the worker while it runs the UNet
        self._pending = 0
        self._idle = threading.Condition(self._state)
        _keep_inductor_cache_in(self.cache_dir / "inductor")

    def __call__(self, sample, timestep, encoder_hidden_states, *args: Any, return_dict: bool = True, **kwargs: Any):
        if not args and plain_kwargs(kwargs) and _inference_call(sample, timestep, encoder_hidden_states):
            key = call_key(sample, timestep, encoder_hidden_states)
            compiled = self.adopted.get(key)
            if compiled is not None and compiled.guard_check(self.unet, sample, timestep, encoder_hidden_states, return_dict=False):
                output = compiled(self.unet, sample, timestep, encoder_hidden_states, return_dict=False)[0]
                return (output,) if not return_dict else unet_output(output)
            if compiled is None:
                self.request(key)
        return self.eager(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)

    def tag(self, sample, timestep, encoder_hidden_states) -> bool:
        """True when a call with these inputs runs compiled (cudagraphs records each kind apart)."""
        return (bool(self.adopted)  # nothing taken up yet: no key to build on every step
                and _inference_call(sample, timestep, encoder_hidden_states)
                and call_key(sample, timestep, encoder_hidden_states) in self.adopted)

    def reject(self, sample, timestep, encoder_hidden_states) -> None:
        """Stop using the compiled UNet for calls like these (its CUDA graph could not be recorded, say);
        that shape runs uncompiled from then on and is not compiled again."""
        key = call_key(sample, timestep, encoder_hidden_states)
        with self._state:
            self.adopted.pop(key, None)
            self.ready.pop(key, None)
            self.sources[key] = "failed"

    def request(self, key: tuple) -> None:
        """Have the worker compile (or load) a UNet for calls of `key`, once."""
        with self._state:
            if key in self.requested or len(self.requested) >= self.max_shapes:
                return
            self.requested.add(key)
            self._pending += 1
        _submit(self, key)

    def adopt(self) -> list[tuple]:
        """Take up the compiled UNets the worker has finished; returns their keys."""
        with self._state:
            keys = list(self.ready)
            self.adopted.update(self.ready)
            self.ready.clear()
        return keys

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker has nothing left to do; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    @contextmanager
    def exclusive(self):
        """Keep the worker's GPU work out (a prediction holds this while it runs)."""
        with self._gpu:
            yield

    def _work(self, key: tuple) -> None:
        """The worker's job for one shape: a compiled UNet in `ready`, or a warning and that shape eager."""
        start = time.perf_counter()
        try:
            compiled, how = self._obtain(key)
        except Exception as error:  # that shape stays eager; the server goes on
            log.warning("compiled UNet for latents %s not available (%s: %s); that shape runs uncompiled",
                        _shape(key), type(error).__name__, error)
            compiled, how = None, "failed"
        with self._state:
            self.sources[key] = how
            if compiled is not None:
                self.seconds[key] = time.perf_counter() - start
                self.ready[key] = compiled
                log.info("UNet for latents %s %s in %.1f s; predictions use it from the next one",
                         _shape(key), how, self.seconds[key])
            self._pending -= 1
            self._idle.notify_all()

    def _obtain(self, key: tuple) -> tuple[Any, str]:
        """Load the compiled UNet for `key` from the cache, else compile it in a child process and load
        that; check it against the eager UNet."""
        inference = key[-1]
        path = self._path(key)
        # Guards are built and checked under the calls' own mode. On a GPU the worker's own work goes on
        # a stream of its own: on the default stream it would wait for, and break, a CUDA graph that a
        # prediction is recording at the same moment.
        stream = torch.cuda.stream(torch.cuda.Stream(key[3])) if key[3].startswith("cuda") else nullcontext()
        with torch.inference_mode(inference), stream:
            compiled, how = None, "loaded"
            if path.exists():
                try:
                    compiled = self._load(path)
                except Exception as error:
                    log.warning("saved compiled UNet %s not loaded (%s: %s); compiling it again",
                                path.name, type(error).__name__, error)
                    path.unlink(missing_ok=True)
            if compiled is None:
                _compile_in_child(self.unet, key, path)
                compiled, how = self._load(path), "compiled"
            self._check(compiled, key)
        return compiled, how

    def _load(self, path: Path):
        with path.open("rb") as file:
            return torch.compiler.load_compiled_function(file, external_data=_external(self.unet))

    def _check(self, compiled, key: tuple) -> None:
        """Run the compiled and the eager UNet on the same random inputs; refuse the compiled one if they differ."""
        with self._gpu:
            inputs = _example(key)
            if not compiled.guard_check(self.unet, *inputs, return_dict=False):
                raise RuntimeError("its guards refuse the inputs it was made for")
            ours = compiled(self.unet, *inputs, return_dict=False)[0]
            eager = self.eager(*inputs, return_dict=False)[0]
            error = float((ours.float() - eager.float()).norm() / eager.float().norm().clamp_min(1e-12))
            del inputs, ours, eager
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # what this check used stays cached for the worker's stream otherwise
        if not error <= MAX_RELATIVE_ERROR:
            raise RuntimeError(f"it differs from the eager UNet by {error:.2e} (relative L2; at most {MAX_RELATIVE_ERROR} allowed)")

    def _path(self, key: tuple) -> Path:
        digest = hashlib.sha256(json.dumps([_environment(self.unet), repr(key)]).encode()).hexdigest()[:20]
        return self.cache_dir / f"unet-{digest}.aot"


# One worker thread per process, for every CompiledForward, alive until the process exits (stopped at
# exit): one compile at a time is what a server can afford beside its predictions.
_jobs: queue.SimpleQueue[tuple[CompiledForward, tuple] | None] = queue.SimpleQueue()
_worker: threading.Thread | None = None
_worker_lock = threading.Lock()
_children: set[subprocess.Popen] = set()  # compile processes running now
_exiting = threading.Event()


def _submit(forward: CompiledForward, key: tuple) -> None:
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = threading.Thread(target=_serve, name="unet-compile", daemon=True)
            _worker.start()
            atexit.register(_stop)
    _jobs.put((forward, key))


def _serve() -> None:
    while (job := _jobs.get()) is not None:
        forward, key = job
        forward._work(key)
        del job, forward  # nothing of a finished job stays alive here


def _stop(timeout: float = 10.0) -> None:
    """At exit: end a compile still running (nothing would load it), and let the worker end."""
    _exiting.set()
    _jobs.put(None)
    for child in list(_children):
        child.kill()
    if _worker is not None:
        _worker.join(timeout)


def _compile_in_child(unet: torch.nn.Module, key: tuple, path: Path) -> None:
    """Compile the UNet for `key` in a fresh interpreter that saves it at `path`.

    Not in this process: compiling traces modules with torch.fx, which patches torch.nn.Module.__call__
    for every thread while it runs, so a prediction running beside it fails ("module is not installed
    as a submodule", reproduced on the CPU); the child runs at a lower CPU priority, has its own GIL,
    and a crash there costs only the compile. It builds its own UNet from the config with uninitialised
    weights: the compiled code depends on the shapes, dtypes and layout, not on the values."""
    parameter = next(unet.parameters())
    command = [
        sys.executable, "-m", "inpaint.compiled", "--config", json.dumps(dict(unet.config), default=str),
        "--dtype", str(parameter.dtype), "--device", str(parameter.device), "--key", json.dumps(key), "--out", str(path),
        "--parent", str(os.getpid()),
    ]
    if unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
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


def aot_compile(unet: torch.nn.Module, key: tuple):
    """A compiled UNet for calls of `key` (torch 2.11's ahead-of-time compile: it refuses other inputs
    rather than compiling again). Called in the child process, under the calls' inference mode."""
    import torch._dynamo

    torch._dynamo.config.enable_aot_compile = True
    function = torch.compile(
        type(unet).forward,
        fullgraph=True,
        dynamic=False,
        # guards on the inputs' shapes, strides and dtypes and on grad mode; not on the module's
        # identity, which cannot be saved (the same UNet object is passed at every call)
        options={"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe},
    )
    return function.aot_compile(((unet, *_example(key)), {"return_dict": False}))


def call_key(sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> tuple:
    """What a compiled UNet is specialised to: the inputs' shapes, strides, dtypes, devices, and inference mode."""
    return (
        tuple(sample.shape), sample.stride(), str(sample.dtype), str(sample.device),
        tuple(encoder_hidden_states.shape), str(encoder_hidden_states.dtype),
        tuple(timestep.shape), str(timestep.dtype), str(timestep.device),
        torch.is_inference_mode_enabled(),
    )


def _example(key: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random inputs of the kind `key` describes (made under the mode the caller set)."""
    shape, stride, dtype, device, hidden_shape, hidden_dtype, step_shape, step_dtype, step_device, _ = key
    sample = torch.empty_strided(shape, stride, dtype=_dtype(dtype), device=device).normal_()
    hidden = torch.randn(hidden_shape, dtype=_dtype(hidden_dtype), device=device)
    timestep = torch.full(step_shape, 500, dtype=_dtype(step_dtype), device=step_device)
    return sample, timestep, hidden


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _shape(key: tuple) -> str:
    return "x".join(map(str, key[0]))


def _environment(unet: torch.nn.Module) -> list:
    """What a saved compiled UNet depends on besides the call: versions, the device, the UNet's config and layout."""
    import diffusers

    parameter = next(unet.parameters())
    device = parameter.device
    gpu = [torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)] if device.type == "cuda" else []
    layout = [conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in (unet.conv_in, unet.conv_out)]
    return [torch.__version__, diffusers.__version__, str(device.type), gpu, str(parameter.dtype), layout,
            json.dumps(dict(unet.config), sort_keys=True, default=str)]


def _external(unet: torch.nn.Module) -> dict[str, Any]:
    """The functions a saved compiled UNet refers to, which are passed in again when it is loaded
    (diffusers wraps UNet2DConditionModel.forward in a decorator; the original cannot be pickled by name)."""
    forward = type(unet).forward
    return {"unet.forward": forward, "unet.forward.inner": inspect.unwrap(forward)}


def _usable(folder: Path | None) -> Path:
    """`folder`, made if needed, when this process can write there; else a temporary folder (the
    compiled UNets then last as long as this process)."""
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                return folder
        except OSError as error:
            log.warning("compiled UNets cannot be kept in %s (%s); they are kept for this process only", folder, error)
    return Path(tempfile.mkdtemp(prefix="inpaint-compiled-"))


def _keep_inductor_cache_in(folder: Path) -> None:
    """Inductor's kernels and autotuning results, kept beside the compiled functions that use them (a
    loaded function whose kernels are not in this cache builds them again). A folder the deployment
    chose with TORCHINDUCTOR_CACHE_DIR is left as it is; torch sets its own default in /tmp on import."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def _save(compiled, path: Path, unet: torch.nn.Module) -> None:
    """Write atomically: a reader sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}")
    compiled.save_compiled_function(str(partial), external_data=_external(unet))
    os.replace(partial, path)


def _inference_call(*values) -> bool:
    return all(isinstance(value, torch.Tensor) for value in values) and not torch.is_grad_enabled()


def use_compiled(unet: torch.nn.Module, cache_dir: Path | None = None, **limits: int) -> CompiledForward:
    """Route `unet(...)` through a CompiledForward (the module, its config and weights stay as they are)."""
    compiled = CompiledForward(unet, cache_dir, **limits)
    unet.forward = compiled
    return compiled


def of(unet: torch.nn.Module) -> CompiledForward | None:
    """The CompiledForward under `unet.forward` (beneath the CUDA graphs, say), if there is one."""
    forward = vars(unet).get("forward")
    while forward is not None and not isinstance(forward, CompiledForward):
        forward = getattr(forward, "eager", None)
    return forward


@contextmanager
def prediction(unet: torch.nn.Module):
    """Around one prediction: take up the compiled UNets that are ready, and keep the worker off the GPU."""
    compiled = of(unet)
    with compiled.exclusive() if compiled else nullcontext():
        for key in compiled.adopt() if compiled else ():
            log.info("this prediction uses the compiled UNet for latents %s", _shape(key))
        yield


def main(argv: list[str] | None = None) -> int:
    """The child process of _compile_in_child: build the UNet, compile it for one key, save it."""
    import argparse

    parser = argparse.ArgumentParser(description="Compile the UNet for one working shape and save it.")
    parser.add_argument("--config", required=True, help="the UNet's config as JSON")
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
    # A process that ends after one compile: no cyclic garbage collection over the objects tracing and
    # lowering make (2,500 collections, 2.4 s of a 52 s compile of the tiny UNet on the CPU; ~70 MB more
    # memory at the peak).
    gc.disable()
    from diffusers import UNet2DConditionModel

    key = _key_from_json(json.loads(args.key))
    with torch.device("meta"):  # no weights read or initialised: their values do not matter here
        unet = UNet2DConditionModel.from_config(json.loads(args.config)).to(_dtype(args.dtype)).eval()
    unet = unet.to_empty(device=args.device)
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode(key[-1]):
        compiled = aot_compile(unet, key)
    _save(compiled, args.out, unet)
    print(f"compiled the UNet for latents {_shape(key)} in {time.perf_counter() - start:.1f} s: {args.out}")
    return 0


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
