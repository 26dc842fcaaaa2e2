"""Shared fixtures: tiny random weights written once per session, images, the real Cog server."""

from __future__ import annotations

import functools
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "script"))  # cogserver: the helper that runs Cog's server from this checkout

from inpaint import inputs as _inputs, pipeline  # noqa: E402


@pytest.fixture
def report(record_property):
    """Record a measured figure; all of them are printed at the end of the run. They travel as the test's
    report properties, so they reach the summary from pytest-xdist's workers too."""
    return functools.partial(record_property, "measured")


def pytest_terminal_summary(terminalreporter):
    measured = [value for reports in terminalreporter.stats.values() for report in reports
                if getattr(report, "when", None) == "call" for key, value in report.user_properties if key == "measured"]
    if measured:
        terminalreporter.section("measured")
        for line in measured:
            terminalreporter.write_line(line)


@contextmanager
def inductor_cache_variable(value: str | None) -> Iterator[None]:
    """TORCHINDUCTOR_CACHE_DIR set to `value` (None: unset) while held, then put back as it was. The code
    under test sets the variable itself (a CompiledPart points it at its folder, for its compile processes
    to inherit), which monkeypatch, undoing only its own changes, does not put back."""
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        _set_inductor_cache(value)
        yield
    finally:
        _set_inductor_cache(before)


def _set_inductor_cache(value: str | None) -> None:
    if value is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = value


@pytest.fixture(autouse=True)
def _inductor_cache_kept():
    """No test leaves TORCHINDUCTOR_CACHE_DIR pointing into its own folder for the tests after it."""
    with inductor_cache_variable(os.environ.get("TORCHINDUCTOR_CACHE_DIR")):
        yield


# The slow tier: whole modules that compile, start Cog's server or soak it, and any test that uses the
# shared server; a few others are marked where they are. `script/test -m "not slow"` leaves them out.
SLOW_MODULES = {"test_compiled", "test_reliability", "test_http", "test_bench", "test_readme"}
SLOW_FIXTURES = {"server", "webhook", "faulty_server"}


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    has_weights = (ROOT / "weights" / "model_index.json").is_file()
    for item in items:
        if item.module.__name__ in SLOW_MODULES or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "real_weights" in item.keywords and not has_weights:
            item.add_marker(pytest.mark.skip(reason="needs the real checkpoint in weights/ (script/download-weights)"))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """The tiny random checkpoint, written by the same script users run. Its own manifest is trusted
    for the session as a deployment trusts one: INPAINT_WEIGHTS_MANIFEST_SHA256 pins it (the servers
    the tests start inherit the variable; in-process tests use tiny_settings)."""
    from inpaint.weights import manifest_pin

    if os.environ.get("TEST_TINY_WEIGHTS"):  # one written before by the same script (script/mutation does)
        out = Path(os.environ["TEST_TINY_WEIGHTS"])
    else:
        out = tmp_path_factory.mktemp("tiny-weights")
        subprocess.run([sys.executable, str(ROOT / "script" / "make-tiny-weights"), str(out)], check=True)
    os.environ["INPAINT_WEIGHTS_MANIFEST_SHA256"] = manifest_pin(out)
    return out


@pytest.fixture
def https(tmp_path, monkeypatch):
    """A real https server (tests/https_server.py) whose certificate the clients trust through SSL_CERT_FILE."""
    from https_server import HttpsServer

    server = HttpsServer(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(server.cert))
    yield server
    server.close()


@pytest.fixture
def host(tmp_path):
    """A real HTTP host on loopback (tests/webhost.py) serving a photo, and the routes of hostile hosts."""
    from webhost import Host

    with closing(Host(make_photo(tmp_path / "photo.png").read_bytes())) as running:
        yield running


@pytest.fixture
def folder(tmp_path):
    """The folder fetched inputs go to."""
    (tmp_path / "in").mkdir()
    return tmp_path / "in"


@pytest.fixture
def unanswered(monkeypatch):
    """socket.getaddrinfo for a name whose DNS server does not answer: it blocks (glibc's for `timeout` times
    `attempts` for each server resolv.conf(5) lists; here until `release` is set, or the test ends), then
    fails with EAI_AGAIN ("Temporary failure in name resolution"). Other names are the real one's."""
    real, release = socket.getaddrinfo, threading.Event()

    def getaddrinfo(host, port, *args):
        if host != "unanswered.example.test":
            return real(host, port, *args)
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield release
    release.set()


class Counting:
    """Counts the calls that reach a compiled part (to see that a prediction used it)."""

    def __init__(self, compiled) -> None:
        self.compiled, self.calls = compiled, 0

    def guard_check(self, *args, **kwargs):
        return self.compiled.guard_check(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.compiled(*args, **kwargs)


@pytest.fixture(scope="session")
def inductor_cache(tmp_path_factory) -> Path:
    """One Inductor cache for the session's compiles (TORCHINDUCTOR_CACHE_DIR), as a deployment that chose
    one keeps it: a part compiled again at the same shape, by another test or by the bake, reuses the
    kernels built before. Tests of where Inductor's own cache goes leave the variable unset."""
    return tmp_path_factory.mktemp("inductor")


@pytest.fixture(scope="session")
def tiny_settings(tiny_weights):
    """Settings() that trust the tiny weights' manifest."""
    from inpaint.config import Settings
    from inpaint.weights import manifest_pin

    return Settings(weights_manifest_sha256=manifest_pin(tiny_weights))


@pytest.fixture(scope="session")
def inpainter(tiny_weights, tiny_settings):
    from inpaint.service import Inpainter

    return Inpainter.load(str(tiny_weights), tiny_settings)


def make_photo(path: Path, size=(200, 120), mode="RGB", fmt=None) -> Path:
    """A deterministic, textured test photo."""
    width, height = size
    image = Image.new("RGB", size)
    pixels = image.load()
    for x in range(width):
        for y in range(height):
            pixels[x, y] = ((x * 7) % 256, (y * 5) % 256, ((x + y) * 3) % 256)
    image.convert(mode).save(path, format=fmt)
    return path


def make_mask(path: Path, size=(200, 120), box=None) -> Path:
    width, height = size
    box = box or (width // 4, height // 4, width // 2, height // 2)
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    mask.save(path)
    return path


# ---------------------------------------------------------------- shared helpers of the model tests


def pipeline_inputs():
    """A 64x64 photo and a square mask, for pipeline.generate."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return image, mask


def run_pipeline(pipe, fast=None) -> list[np.ndarray]:
    """Two outputs of 4 steps on pipeline_inputs(), as int16 arrays (to subtract); `fast`: the fast path installed on `pipe`."""
    image, mask = pipeline_inputs()
    job = pipeline.Generation("a red chair", None, 2, 4, 7.5, 1.0, "DPMSolverMultistep", 3)
    return [np.asarray(output, dtype=np.int16) for output in pipeline.generate(pipe, [image], [mask], job, fast=fast)[0]]


def compiling_pipeline(tiny_weights, cache_dir, **options):
    """A CPU pipeline and its fast path, installed as on a GPU and compiling in the background into `cache_dir`
    (FastPath.for_device leaves it off on the CPU); `options` are FastPath's. Returns (pipe, fast)."""
    from inpaint.fastpath import FastPath

    fast = FastPath(compile="background", cache_dir=cache_dir, **options)
    return pipeline.load_pipeline(tiny_weights, torch.device("cpu"), torch.float32, fast), fast


def tiny_unet(tiny_weights, device, dtype=torch.float32) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_weights, subfolder="unet", variant="fp16").to(device, dtype).eval()


def unet_inputs(unet, device, batch=2, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=generator)
    states = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    dtype = unet.dtype
    return sample.to(device, dtype), torch.tensor(int(torch.randint(0, 1000, (1,), generator=generator))).to(device), states.to(device, dtype)


PREDICT_DEFAULTS = dict(  # every input of Predictor.run, small and fast
    prompt=_inputs.DEFAULT_PROMPT,
    negative_prompt=None,
    width=64,
    height=64,
    num_outputs=1,
    num_inference_steps=2,
    guidance_scale=_inputs.DEFAULT_GUIDANCE,
    scheduler=_inputs.DEFAULT_SCHEDULER,
    seed=1,
    invert_mask=False,
    mask_grow=0,
    mask_blur=_inputs.DEFAULT_MASK_BLUR,
    mask_padding=_inputs.DEFAULT_MASK_PADDING,
    strength=1.0,
    output_format="png",
    output_quality=90,
    disable_safety_checker=False,
    outpaint_left=0,
    outpaint_right=0,
    outpaint_up=0,
    outpaint_down=0,
)


@pytest.fixture
def photo(tmp_path) -> Path:
    return make_photo(tmp_path / "photo.png")


@pytest.fixture
def mask(tmp_path) -> Path:
    return make_mask(tmp_path / "mask.png")


class LoopbackReceiver:
    """A real HTTP endpoint on loopback: each POST's body goes to `take` (under `arrived`, which then
    notifies), and is answered 200 with `reply()`. Subclasses say what they collect."""

    path = ""

    def __init__(self) -> None:
        self.arrived = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.arrived:
                    receiver.take(body, self)
                    receiver.arrived.notify_all()
                reply, content_type = receiver.reply()
                self.send_response(200)
                if content_type:
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{self.path}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def take(self, body: bytes, request: http.server.BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    def reply(self) -> tuple[bytes, str]:
        return b"", ""

    def close(self) -> None:
        self.httpd.shutdown()


class WebhookReceiver(LoopbackReceiver):
    """The webhook events Cog's server sends."""

    path = "/webhook"

    def __init__(self) -> None:
        self.events: list[dict] = []
        super().__init__()

    def take(self, body: bytes, request) -> None:
        self.events.append(json.loads(body))

    def wait_for(self, predicate, timeout: float = 60.0) -> dict:
        with self.arrived:
            found = self.arrived.wait_for(lambda: next((e for e in self.events if predicate(e)), None), timeout)
        if not found:
            raise TimeoutError(f"no matching webhook in {timeout}s; got {[e.get('status') for e in self.events]}")
        return found


@pytest.fixture
def webhook():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def server(tiny_weights, tmp_path_factory):
    """The real Cog server (coglet) started from the repo root with the tiny weights."""
    from cogserver import CogServer

    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with CogServer(tiny_weights, log_path=log_path) as running:
        yield running


@pytest.fixture(scope="session")
def faulty_server(tiny_weights, tmp_path_factory):
    """The real Cog server running tests/faulty_predict.py: the prompt FAULT_PROMPT injects a sticky CUDA
    error, after which the container is UNHEALTHY for good (so the tests that use it come after the fault)."""
    from cogserver import CogServer

    log_path = tmp_path_factory.mktemp("faulty") / "server.log"
    with CogServer(tiny_weights, log_path=log_path, env={"COG_PREDICT_TYPE_STUB": "tests/faulty_predict.py:Predictor"}) as running:
        yield running
