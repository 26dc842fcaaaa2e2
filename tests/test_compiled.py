"""The UNet compiled in the background: real torch.compile on the tiny UNet in a child process (on the
CPU here, where Inductor writes C++ kernels; on a GPU, Triton ones), taken up between predictions,
saved and loaded."""

import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inpaint import pipeline
from inpaint.fastpath import FastPath, UNetPart, compiler
from inpaint.fastpath.compiler import CompiledPart, Compiler

from conftest import ROOT, Counting, compiling_pipeline, inductor_cache_variable, run_pipeline, tiny_unet, unet_inputs


pytestmark = pytest.mark.xdist_group("inductor")  # with test_artifact.py, in one worker (see there)

WAIT = 600  # seconds; a cold compile of the tiny UNet takes 20-50 s on a 2-core CPU


def _run(pipe_and_fast) -> list[np.ndarray]:
    return run_pipeline(*pipe_and_fast)


def _unet_part(unet, cache_dir=None, **limits) -> CompiledPart:
    """The UNet's calls through its compiled part alone (no CUDA graphs), on a compiler of its own."""
    part = CompiledPart(unet, "unet", Compiler(), cache_dir, **limits)
    unet.forward = UNetPart(unet, "unet", compiled=part)
    return part


@pytest.fixture(scope="module", autouse=True)
def _shared_inductor_cache(inductor_cache):
    """Compiles here build Inductor's kernels once per session (conftest.inductor_cache); the children of
    the compile worker inherit the variable."""
    with inductor_cache_variable(str(inductor_cache)):
        yield


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compiled")


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def first_start(tiny_weights, cache_dir):
    """A pipeline whose first prediction asked for the compiled UNet and VAE, that prediction's images,
    and what the worker logged until every part was ready (the parts' compiles end with the module)."""
    plain = run_pipeline(pipeline.load_pipeline(tiny_weights, torch.device("cpu"), torch.float32))
    logger, messages = logging.getLogger("inpaint.fastpath.compiler"), _Messages()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(messages)
    try:
        pipe = compiling_pipeline(tiny_weights, cache_dir)
        first = _run(pipe)
        yield pipe, plain, first, messages.messages
        assert pipe[1].wait(WAIT)
    finally:
        logger.removeHandler(messages)
        logger.setLevel(level)


def test_a_prediction_asks_for_the_compiled_unet_and_does_not_wait(first_start):
    (pipe, fast), plain, first, _ = first_start
    worker = fast.compiled_parts[0]
    assert pipe.unet.forward is fast.parts["unet"] and fast.parts["unet"].compiled is worker
    assert fast.parts["unet"].graphs is not None  # CUDA graphs too (a pass-through on the CPU)
    assert len(worker.requested) == 1 and not worker.adopted  # the first prediction ran uncompiled
    (key,) = worker.requested
    assert key.shape == (4, 9, 8, 8)  # two outputs of 64x64 pixels, doubled by classifier-free guidance
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(plain, first))  # channels_last: rounding


def test_predictions_go_on_while_it_compiles_and_the_next_one_uses_it(first_start, cache_dir):
    pipe, plain, _, _ = first_start
    worker = pipe[1].compiled_parts[0]
    during = 0
    while not worker.wait(0.2):  # the compile runs in a child process, so nothing here is disturbed
        # (the last of these may already take up the compiled UNet: equal to plain up to rounding)
        assert all(np.abs(a - b).max() <= 2 for a, b in zip(plain, _run(pipe)))
        during += 1
    assert during > 0
    (key,) = worker.requested
    assert worker.sources[key] == "compiled"
    worker.adopt()  # (or the last prediction above did)
    counting = worker.adopted[key] = Counting(worker.adopted[key])
    second = _run(pipe)
    assert counting.calls == 4  # every one of the 4 steps
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(plain, second))
    assert sorted(path.suffix for path in cache_dir.glob("unet-*")) == [".aot", ".hmac"]  # the part and its seal
    assert not list(cache_dir.glob(".*partial*"))


def test_the_vae_is_compiled_after_the_unet_and_the_next_prediction_uses_it(first_start, cache_dir):
    pipe, plain, _, messages = first_start
    workers = pipe[1].compiled_parts
    assert [worker.part for worker in workers] == ["unet", "vae.decoder", "vae.encoder"]
    assert all(worker.wait(WAIT) for worker in workers)
    assert [list(worker.sources.values()) for worker in workers] == [["compiled"]] * 3
    done = [message.split(" compiled in ")[0] for message in messages if " compiled in " in message]
    assert done == ["UNet for latents 4x9x8x8", "VAE decoder for latents 1x4x8x8", "VAE encoder for images 1x3x64x64"]
    counting = []
    for worker in workers:
        worker.adopt()
        (key,) = worker.adopted
        counting.append(Counting(worker.adopted[key]))
        worker.adopted[key] = counting[-1]
    painted = _run(pipe)
    assert [count.calls for count in counting] == [4, 2, 1]  # 4 steps; each output decoded apart; one image encoded
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(plain, painted))
    assert sorted(path.name.rsplit("-", 1)[0] for path in cache_dir.glob("*.aot")) == ["unet", "vae-decoder", "vae-encoder"]


def test_a_later_start_loads_the_saved_unet(first_start, tiny_weights, cache_dir, caplog):
    pipe, plain, _, _ = first_start
    assert pipe[1].compiled_parts[0].wait(WAIT)  # saved by the first start
    later = compiling_pipeline(tiny_weights, cache_dir)
    with caplog.at_level(logging.INFO, logger="inpaint.fastpath"):
        _run(later)
        worker = later[1].compiled_parts[0]
        assert worker.wait(WAIT)
        assert list(worker.sources.values()) == ["loaded"]
        assert all(np.abs(a - b).max() <= 2 for a, b in zip(plain, _run(later)))
    assert worker.adopted and "uses the compiled UNet for latents 4x9x8x8" in caplog.text


def test_a_rejected_compiled_unet_is_set_aside_and_taken_up_again_by_a_later_prediction(first_start, tiny_weights,
                                                                                            cache_dir, caplog):
    """Rejected (its CUDA graph could not be recorded), the compiled UNet is not used for the calls of
    its wait, nor compiled again; then it is handed over, and the next prediction takes it up whole."""
    pipe, plain, first, _ = first_start
    assert pipe[1].compiled_parts[0].wait(WAIT)
    later = compiling_pipeline(tiny_weights, cache_dir)
    _run(later)
    worker = later[1].compiled_parts[0]
    # Every part loaded first: the VAE's load after the UNet's, and the next prediction takes them up (not
    # sometimes before it and sometimes after, as when this waited for the UNet alone).
    assert later[1].wait(WAIT) and list(worker.sources.values()) == ["loaded"]
    worker.adopt()
    (key,) = worker.adopted
    calls = worker.adopted[key] = Counting(worker.adopted[key])
    worker.reject(key, retry_after_calls=4)  # what the UNet's FastPart does when the compiled UNet's graph cannot be recorded
    assert not worker.adopted and key in worker.set_aside
    with caplog.at_level(logging.INFO, logger="inpaint.fastpath"):
        # its 4 UNet calls uncompiled (calls.calls below), the VAE compiled: the same picture within fp32 rounding
        assert all(np.abs(a - b).max() <= 2 for a, b in zip(plain, _run(later)))
        assert calls.calls == 0 and worker._pending == 0 and not worker.adopted and not worker.set_aside
        assert "the compiled UNet for latents 4x9x8x8 is handed over again, after its CUDA graph failed" in caplog.text
        again = _run(later)
    assert calls.calls == 4 and list(worker.adopted) == [key] and worker.sources[key] == "loaded"
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(plain, again))


def test_a_compiled_unet_that_disagrees_with_the_eager_one_is_refused(first_start, tiny_weights, cache_dir, caplog, monkeypatch):
    pipe, _, first, _ = first_start
    assert pipe[1].compiled_parts[0].wait(WAIT)
    monkeypatch.setattr(compiler, "MAX_RELATIVE_ERROR", -1.0)  # any difference at all is too much
    later = compiling_pipeline(tiny_weights, cache_dir)
    with caplog.at_level(logging.WARNING, logger="inpaint.fastpath.compiler"):
        _run(later)
        worker = later[1].compiled_parts[0]
        assert worker.wait(WAIT)
    assert "differs from the eager UNet" in caplog.text and "runs uncompiled" in caplog.text
    assert list(worker.sources.values()) == ["failed"] and not worker.ready
    assert all(np.array_equal(a, b) for a, b in zip(first, _run(later)))  # uncompiled, and not asked for again
    assert not worker.adopted and worker._pending == 0


def test_a_damaged_saved_unet_is_compiled_again(first_start, tiny_weights, cache_dir, caplog):
    pipe, plain, _, _ = first_start
    assert pipe[1].compiled_parts[0].wait(WAIT)
    (saved,) = cache_dir.glob("unet-*.aot")
    saved.write_bytes(b"not a compiled function")
    later = compiling_pipeline(tiny_weights, cache_dir)
    with caplog.at_level(logging.WARNING, logger="inpaint.fastpath.compiler"):
        _run(later)
        worker = later[1].compiled_parts[0]
        assert worker.wait(WAIT)
    assert f"saved compiled UNet {saved.name} not loaded" in caplog.text
    assert list(worker.sources.values()) == ["compiled"]
    assert saved.stat().st_size > 1000  # saved again, whole
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(plain, _run(later)))


def test_a_failed_compile_leaves_the_shape_uncompiled_and_says_why(tiny_weights, caplog, monkeypatch):
    monkeypatch.setattr(compiler, "COMPILE_TIMEOUT", 0.5)  # the child cannot even import torch in that time
    unet = tiny_unet(tiny_weights, "cpu")
    worker = _unet_part(unet)
    with caplog.at_level(logging.WARNING, logger="inpaint.fastpath.compiler"), torch.inference_mode():
        inputs = unet_inputs(unet, "cpu")
        expected = worker.eager(*inputs, return_dict=False)[0]
        assert torch.equal(unet(*inputs, return_dict=False)[0], expected)
        assert worker.wait(WAIT)
        assert torch.equal(unet(*inputs, return_dict=False)[0], expected)
    assert list(worker.sources.values()) == ["failed"] and not worker.ready and not worker.adopted
    assert "compiled UNet for latents 2x9x8x8 not available" in caplog.text
    assert "the compile process took longer than 0.5 s and was stopped" in caplog.text and "runs uncompiled" in caplog.text


def _running(pid: int) -> bool:
    """True while process `pid` runs (a zombie waiting for its new parent to reap it has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# A stand-in server, in a fresh interpreter: its first UNet call asks for a compile, it waits until the
# compile process runs (started by the real Compiler.compile_in_child), says that process's pid, then ends as
# `ending` says.
_SERVER = (
    "import os, sys, time, torch\n"
    "from pathlib import Path\n"
    "from conftest import tiny_unet, unet_inputs\n"
    "from inpaint.fastpath import UNetPart\n"
    "from inpaint.fastpath.compiler import CompiledPart, Compiler\n"
    "unet = tiny_unet(sys.argv[1], 'cpu')\n"
    "compiler = Compiler()\n"
    "unet.forward = UNetPart(unet, 'unet', compiled=CompiledPart(unet, 'unet', compiler, Path(sys.argv[2])))\n"
    "with torch.inference_mode():\n"
    "    unet(*unet_inputs(unet, 'cpu'))\n"
    "while not compiler.children:\n"
    "    time.sleep(0.05)\n"
    "(child,) = compiler.children\n"
    "print(child.pid, flush=True)\n"
)


def _serve_and_end(tiny_weights, cache_dir, ending: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, "-c", _SERVER + ending, str(tiny_weights), str(cache_dir)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=WAIT)


def test_a_compile_whose_server_is_gone_ends_and_saves_nothing(tiny_weights, tmp_path):
    # os._exit: no exit hooks run, as when a server is killed
    started = _serve_and_end(tiny_weights, tmp_path, "os._exit(0)\n")
    assert started.returncode == 0, started.stderr[-2000:]
    pid, begin = int(started.stdout), time.monotonic()
    while _running(pid) and time.monotonic() - begin < WAIT:
        time.sleep(0.2)
    assert not _running(pid)
    assert time.monotonic() - begin < 60  # its imports, then half a second
    assert not list(tmp_path.glob("unet-*.aot")) and not list(tmp_path.glob("*partial*"))


def test_a_process_that_exits_mid_compile_ends_the_compile_and_does_not_wait_for_it(tiny_weights, tmp_path):
    """A server stopped while its worker waits for a compile: the compile process is ended at exit, the
    worker thread too, and the exit takes well under the 10 s the worker is given."""
    # the child is importing torch for these 2 s: well before its compile could end
    result = _serve_and_end(tiny_weights, tmp_path, "time.sleep(2)\nprint(time.monotonic(), flush=True)\n")
    ended = time.monotonic()
    assert result.returncode == 0, result.stderr[-2000:]
    pid, exiting = result.stdout.split()
    assert ended - float(exiting) < 5
    assert not _running(int(pid))
    assert not list(tmp_path.glob("unet-*.aot"))
    assert "this process is exiting" in result.stderr


def test_calls_it_cannot_compile_for_run_eagerly_and_ask_for_nothing(tiny_weights):
    unet = tiny_unet(tiny_weights, "cpu")
    eager = unet.forward
    worker = _unet_part(unet, max_shapes=1)
    sample, timestep, states = unet_inputs(unet, "cpu")
    expected = eager(sample, timestep, states, return_dict=False)[0]
    with torch.no_grad():
        got = unet(sample, timestep, states, cross_attention_kwargs={"scale": 0.5}, return_dict=False)[0]
    assert torch.equal(got, expected) and not worker.requested  # extra inputs: never compiled
    assert unet(sample, timestep, states).sample.requires_grad and not worker.requested  # autograd: never compiled
    other = tiny_unet(tiny_weights, "cpu")
    full = _unet_part(other, max_shapes=0)
    with torch.inference_mode():
        other(*unet_inputs(other, "cpu"))
    assert not full.requested  # past the limit of shapes: eager for good


def test_calls_from_several_threads_at_once_ask_for_one_compile_and_each_get_their_own_result(tiny_weights):
    unet = tiny_unet(tiny_weights, "cpu")
    eager = unet.forward
    part = _unet_part(unet, max_shapes=4)
    inputs = [unet_inputs(unet, "cpu", seed=seed) for seed in range(6)]  # one shape, different values
    with torch.inference_mode():
        expected = [eager(*values, return_dict=False)[0] for values in inputs]
        start = threading.Barrier(len(inputs))

        def call(values):
            start.wait()
            with torch.inference_mode():  # a thread's own mode, as each prediction's thread sets it
                return unet(*values, return_dict=False)[0]

        with ThreadPoolExecutor(len(inputs)) as pool:
            got = list(pool.map(call, inputs))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert len(part.requested) == 1 and part._pending == 1  # one shape: one compile asked for, however many threads called
    part.compiler.stop()  # the compile it started is not wanted here


def _run_at_512(pipe, fast) -> list[np.ndarray]:
    """One output at 512x512: the shape setup's warm-up asks the worker for, so one compile serves all."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (128, 128, 384, 384))
    job = pipeline.Generation("a red chair", None, 1, 4, 7.5, 1.0, "DPMSolverMultistep", 3)
    return [np.asarray(output, dtype=np.int16) for output in pipeline.generate(pipe, [image], [mask], job, fast=fast)[0]]


@pytest.mark.gpu
def test_on_the_gpu_the_graphs_are_recorded_again_from_the_compiled_unet_and_the_vae_is_compiled_too(tiny_weights, tmp_path):
    device = torch.device("cuda")
    plain = FastPath(cuda_graphs=False)
    eager = _run_at_512(pipeline.load_pipeline(tiny_weights, device, torch.float16, plain), plain)
    fast = FastPath(compile="background", cache_dir=tmp_path)
    pipe = pipeline.load_pipeline(tiny_weights, device, torch.float16, fast)
    fast.warm_up(pipe)
    workers = fast.compiled_parts
    key = next(iter(workers[0].requested))  # setup's warm-up asked for 512x512
    assert [len(worker.requested) for worker in workers] == [1, 1, 1]
    before = _run_at_512(pipe, fast)
    assert all(worker.wait(WAIT) for worker in workers)
    assert [list(worker.sources.values()) for worker in workers] == [["compiled"]] * 3
    after = _run_at_512(pipe, fast)
    assert all(worker.adopted for worker in workers)
    assert [graph_key.compiled for graph_key in fast.parts["unet"].graphs.graphs if graph_key.shape == key] == [True]  # re-recorded
    for images in (before, after):
        assert all(np.abs(a - b).max() <= 2 for a, b in zip(eager, images))
