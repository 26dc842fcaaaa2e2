"""Bad input, faults and long runs never take the server down or lose a request (the real Cog server)."""

from __future__ import annotations

import base64
import io
import os
import struct
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogserver import CogServer, decode_data_uri
from conftest import make_mask, make_photo

ROOT = Path(__file__).resolve().parent.parent
SIZE = (96, 64)


# ---------------------------------------------------------------- the corpus


def _uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _file(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _photo(size=SIZE) -> Image.Image:
    return Image.open(make_photo(Path(tempfile.mkdtemp()) / "p.png", size)).convert("RGB")


def _mask(size=SIZE, value=None) -> bytes:
    if value is not None:
        return _file(Image.new("L", size, value), "PNG")
    return make_mask(Path(tempfile.mkdtemp()) / "m.png", size).read_bytes()


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _file(_photo((64, 96)), "JPEG", exif=exif)  # shown as 96x64


def _gif() -> bytes:
    frames = [_photo().convert("P"), Image.new("P", SIZE, 3)]
    return _file(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _palette_with_transparency() -> bytes:
    image = _photo().convert("P")
    return _file(image, "PNG", transparency=0)


def _sixteen_bit() -> bytes:
    return _file(Image.fromarray(np.asarray(_photo().convert("L"), dtype=np.uint16) * 257), "PNG")


GOOD_PNG = _file(_photo(), "PNG")
GOOD_JPEG = _file(_photo(), "JPEG")

# name -> (input overrides, expected): "ok", ("failed", words in the error), or (422, field)
CORPUS = {
    "zero-byte image": ({"image": "data:image/png;base64,"}, ("failed", ["image"])),
    "text file named .png": ({"image": _uri(b"just some text, not an image")}, ("failed", ["image could not be read"])),
    "truncated PNG": ({"image": _uri(GOOD_PNG[: len(GOOD_PNG) // 2])}, ("failed", ["image could not be"])),
    "truncated JPEG": ({"image": _uri(GOOD_JPEG[: len(GOOD_JPEG) // 2], "image/jpeg")}, ("failed", ["image could not be"])),
    "decompression bomb header": ({"image": _uri(_png_header(50000, 50000))}, ("failed", ["image is too large"])),
    "over the pixel limit": ({"image": _uri(_png_header(5000, 4000))}, ("failed", ["image is 5000x4000", "over the limit"])),
    "animated GIF": ({"image": _uri(_gif(), "image/gif")}, "ok"),
    "16-bit PNG": ({"image": _uri(_sixteen_bit())}, "ok"),
    "CMYK JPEG": ({"image": _uri(_file(_photo().convert("CMYK"), "JPEG"), "image/jpeg")}, "ok"),
    "palette PNG with transparency": ({"image": _uri(_palette_with_transparency())}, "ok"),
    "EXIF-rotated JPEG": ({"image": _uri(_exif_rotated(), "image/jpeg")}, "ok"),
    "mask of another size": ({"mask": _uri(_mask((30, 20)))}, "ok"),
    "all-black mask": ({"mask": _uri(_mask(value=0))}, "ok"),
    "all-white mask": ({"mask": _uri(_mask(value=255))}, "ok"),
    "undecodable mask": ({"mask": _uri(b"\x00\x01\x02 garbage")}, ("failed", ["mask could not be read"])),
    "invalid base64 data URI": ({"image": "data:image/png;base64,@@@not base64@@@"}, ("rejected", [])),
    "2,000-character prompt, the most allowed": ({"prompt": "a red fox " * 200}, "ok"),
    "100,000-character prompt": ({"prompt": "a red fox in the snow " * 4546}, (422, "prompt")),
    "Unicode-heavy prompt": ({"prompt": "猫 🐱 кошка قطة चिड़िया \u0000\u200b\U0001F600 " * 20}, "ok"),
    "negative seed": ({"seed": -12345}, "ok"),
    "huge seed": ({"seed": 2**70}, ("failed", ["seed must be between"])),
    "seed past torch's range": ({"seed": 2**64}, ("failed", ["seed must be between"])),
    "non-integer seed": ({"seed": 3.5}, (422, "seed")),
    "whole-number float seed": ({"seed": 3.0}, "ok"),
    "unknown scheduler": ({"scheduler": "Euler"}, (422, "scheduler")),
    "prompt of the wrong type": ({"prompt": 12}, (422, "prompt")),
}

# Every numeric input at, just inside and just outside its bounds.
BOUNDS = {
    "num_outputs": (1, 4, 1),
    "num_inference_steps": (1, 500, 1),
    "guidance_scale": (1.0, 20.0, 0.01),
    "strength": (0.0, 1.0, 0.01),
    "mask_grow": (-64, 64, 1),
    "mask_blur": (0, 64, 1),
    "mask_padding": (0, 512, 1),
    "output_quality": (1, 100, 1),
}
for name, (low, high, step) in BOUNDS.items():
    CORPUS[f"{name} at its minimum"] = ({name: low}, "ok")
    CORPUS[f"{name} at its maximum"] = ({name: high}, "ok")
    CORPUS[f"{name} just inside"] = ({name: round(low + step, 2)}, "ok")
    CORPUS[f"{name} just below"] = ({name: round(low - step, 2)}, (422, name))
    CORPUS[f"{name} just above"] = ({name: round(high + step, 2)}, (422, name))
for name in ("width", "height"):
    CORPUS[f"{name} at 64"] = ({name: 64}, "ok")
    CORPUS[f"{name} at 1024"] = ({name: 1024, "num_inference_steps": 1}, "ok")
    CORPUS[f"{name} off the 64 grid"] = ({name: 100}, (422, name))
    CORPUS[f"{name} above 1024"] = ({name: 1088}, (422, name))
# With num_inference_steps=1, strength below 1 runs no step at all: a clear error, not a crash.
CORPUS["strength just inside"] = ({"strength": 0.01, "num_inference_steps": 100}, "ok")
CORPUS["num_inference_steps at its maximum"] = ({"num_inference_steps": 500, "width": 64, "height": 64}, "ok")


def _base() -> dict:
    return {"image": _uri(GOOD_PNG), "mask": _uri(_mask()), "num_inference_steps": 2, "width": 64, "height": 64, "seed": 1}


@pytest.fixture(scope="class")
def neighbour(server):
    """Another client predicting in a loop beside the corpus, in the server's other slot: each case is served
    while a prediction runs beside it, and every one of the neighbour's predictions must succeed."""
    stop, outcomes = threading.Event(), []

    def loop():
        seed = 0
        while not stop.is_set():
            seed += 1
            status, response = server.predict({**_base(), "seed": seed})
            outcomes.append(response.get("status") if isinstance(response, dict) else status)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(60)
    assert outcomes and set(outcomes) == {"succeeded"}, outcomes[-5:]


class TestCorpus:
    """The corpus, each case served while the neighbour predicts beside it."""

    @pytest.mark.parametrize("case", list(CORPUS), ids=list(CORPUS))
    def test_bad_and_awkward_inputs(self, server, neighbour, case):
        overrides, expected = CORPUS[case]
        server.wait_ready(30)
        started = time.monotonic()
        status, response = server.predict({**_base(), **overrides})
        elapsed = time.monotonic() - started
        if expected == "ok":
            assert status == 200 and response["status"] == "succeeded", (status, response.get("error"))
            for uri in response["output"]:
                Image.open(io.BytesIO(decode_data_uri(uri))).load()
        elif expected[0] == 422:
            assert status == 422, (status, response)
            assert expected[1] in str(response["detail"])
            assert elapsed < 1.0
        else:
            assert (status == 200 and response["status"] == "failed") or status in (400, 422), (status, response)
            error = response.get("error") or str(response.get("detail", ""))
            assert error and "Traceback" not in error and "/tmp/" not in error
            for word in expected[1]:
                assert word in error
            assert elapsed < 1.0, f"a reject took {elapsed:.2f}s"
        # Whatever happened, the server is READY and the next prediction is correct.
        server.wait_ready(30)
        status, response = server.predict(_base())
        assert response["status"] == "succeeded", response.get("error")
        assert Image.open(io.BytesIO(decode_data_uri(response["output"][0]))).size == SIZE


# ---------------------------------------------------------------- faults


def test_limits_are_settings_with_clear_errors(inpainter, tmp_path, monkeypatch):
    import dataclasses

    from inpaint.inputs import check_inputs

    photo, mask = make_photo(tmp_path / "p.png"), make_mask(tmp_path / "m.png")
    tight = dataclasses.replace(inpainter.settings, max_batch_pixels=3 * 64 * 64, max_working_pixels=128 * 64)
    monkeypatch.setattr(inpainter, "settings", tight)
    with pytest.raises(ValueError, match="num_outputs x regions x working size = 4 x 1 x 64x64 .* lower num_outputs"):
        inpainter.inpaint(photo, mask, check_inputs(seed=1, num_outputs=4, width=64, height=64), tmp_path)
    with pytest.raises(ValueError, match="width x height = 128x128 .* over this deployment's limit"):
        inpainter.inpaint(photo, mask, check_inputs(seed=1, width=128, height=128), tmp_path)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own bomb protection stays on


def _children(pid: int) -> list[int]:
    """Child processes of pid, whichever of its threads started them."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return children


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _worker_pid(server: CogServer) -> int:
    workers = [pid for pid in _children(server.process.pid) if "python" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(workers) == 1, workers
    return workers[0]


def test_soak_300_predictions_from_concurrent_clients(server, report):
    """300 predictions, as many clients at once as the server takes: memory, file descriptors and output
    folders stay flat (a folder is removed once OUTPUT_GRACE_SECONDS have passed since its run returned)."""
    from cogserver import concurrency_max
    from inpaint.concurrency import OUTPUT_GRACE_SECONDS

    worker = _worker_pid(server)
    tmp = Path(tempfile.gettempdir())
    clients = concurrency_max()

    def folders():
        return {path: path.stat().st_mtime for path in tmp.iterdir() if path.name.startswith("inpaint-")}

    def run(first: int, count: int, failures: list) -> None:
        for index in range(first, first + count):
            status, response = server.predict({**_base(), "seed": index})
            if not (status == 200 and response["status"] == "succeeded"):
                failures.append((status, response.get("error")))

    warm_up: list = []
    run(0, 20, warm_up)
    assert not warm_up, warm_up
    start_rss, start_fds, start_folders = _rss_mb(worker), len(os.listdir(f"/proc/{worker}/fd")), folders()
    started = time.monotonic()
    failures: list = []
    threads = [threading.Thread(target=run, args=(1000 + client * 1000, 300 // clients, failures)) for client in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert not failures, failures[:3]
    end_rss, end_fds, end_folders = _rss_mb(worker), len(os.listdir(f"/proc/{worker}/fd")), folders()
    stale = [path for path, modified in end_folders.items() if path not in start_folders
             and time.time() - modified > OUTPUT_GRACE_SECONDS + 30]
    summary = (
        f"soak: 300 predictions from {clients} clients in {elapsed:.0f}s ({1000 * elapsed / 300:.0f} ms each); worker "
        f"RSS {start_rss:.0f} -> {end_rss:.0f} MB ({end_rss - start_rss:+.1f} MB); open fds {start_fds} -> {end_fds}; "
        f"output folders {len(start_folders)} -> {len(end_folders)}, {len(stale)} older than the grace period"
    )
    report(summary)
    assert end_rss - start_rss < 50, summary
    assert end_fds <= start_fds + 2, summary
    assert not stale, summary
    assert len(end_folders) <= len(start_folders) + 300 * OUTPUT_GRACE_SECONDS / elapsed + 2, summary
    assert _worker_pid(server) == worker  # the same worker served every prediction


# ---------------------------------------------------------------- concurrency


def test_every_accepted_async_prediction_completes_and_its_webhook_fires(server, webhook):
    ids = []
    for index in range(5):
        server.wait_ready(30)
        prediction_id = f"queue-{index}-{uuid.uuid4().hex[:6]}"
        body = {**_base(), "seed": index}
        if index == 2:
            body["image"] = _uri(b"broken")  # one of them fails, with a reason
        for _ in range(100):
            status, _ = server.request(
                "POST", "/predictions", {"id": prediction_id, "input": body, "webhook": webhook.url,
                                         "webhook_events_filter": ["completed"]}, {"Prefer": "respond-async"}
            )
            if status != 409:
                break
            time.sleep(0.05)
        assert status == 202
        ids.append(prediction_id)
        webhook.wait_for(lambda event, pid=prediction_id: event.get("id") == pid, 60)
    final = {event["id"]: event for event in webhook.events}
    assert [final[pid]["status"] for pid in ids] == ["succeeded", "succeeded", "failed", "succeeded", "succeeded"]
    assert "image could not be read" in final[ids[2]]["error"]


# ---------------------------------------------------------------- shutdown


def test_sigterm_exits_cleanly_and_promptly_while_a_prediction_runs(tiny_weights, tmp_path, webhook):
    running = CogServer(tiny_weights, log_path=tmp_path / "server.log").start()
    worker = _worker_pid(running)
    body = {**_base(), "num_inference_steps": 300, "width": 512, "height": 512}
    status, _ = running.request(
        "POST", "/predictions", {"id": "in-flight", "input": body, "webhook": webhook.url}, {"Prefer": "respond-async"}
    )
    assert status == 202
    webhook.wait_for(lambda event: "denoising" in (event.get("logs") or ""), 60)
    started = time.monotonic()
    assert running.stop(timeout=30) == 0  # SIGTERM; stop() kills only if it has not exited within 30 s
    assert time.monotonic() - started < 15
    assert not Path(f"/proc/{worker}").exists() or "zombie" in Path(f"/proc/{worker}/status").read_text()


def test_sigterm_during_a_sync_prediction_finishes_it_then_exits(tiny_weights, tmp_path):
    running = CogServer(tiny_weights, log_path=tmp_path / "server.log").start()
    body = {**_base(), "num_inference_steps": 60, "width": 256, "height": 256}
    answer: dict = {}

    def post() -> None:
        answer["response"] = running.request("POST", "/predictions", {"input": body})

    client = threading.Thread(target=post)
    client.start()
    deadline = time.monotonic() + 60
    while "denoising" not in running.log_path.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running.stop(timeout=60) == 0  # SIGTERM while the prediction runs
    client.join(60)
    status, response = answer["response"]
    assert status == 200 and response["status"] == "succeeded", (status, response.get("error"))
    assert Image.open(io.BytesIO(decode_data_uri(response["output"][0]))).size == Image.open(io.BytesIO(GOOD_PNG)).size


@pytest.mark.xfail(
    strict=True, raises=TimeoutError,
    reason="coglet 0.23.1 drops a running async prediction on SIGTERM, without a final webhook",
)
def test_sigterm_during_an_async_prediction_still_ends_it_with_a_webhook(tiny_weights, tmp_path, webhook):
    """Cog's server finishes a sync prediction before it exits (the test above), but an async one is
    dropped: it logs "Slot dropped while InUse with non-terminal prediction" and sends no final
    webhook (replicate/cog#896 leaves that to the orchestrator). The model's code never sees the
    shutdown; the container's preStop hook holds SIGTERM off instead (tests/test_deploy.py). When Cog
    fixes it, strict xfail turns this into a failure."""
    running = CogServer(tiny_weights, log_path=tmp_path / "server.log").start()
    body = {**_base(), "num_inference_steps": 60, "width": 256, "height": 256}
    status, _ = running.request(
        "POST", "/predictions", {"id": "draining", "input": body, "webhook": webhook.url}, {"Prefer": "respond-async"}
    )
    assert status == 202
    webhook.wait_for(lambda event: "denoising" in (event.get("logs") or ""), 60)
    assert running.stop(timeout=60) == 0
    webhook.wait_for(lambda event: event.get("status") in ("succeeded", "failed", "canceled"), 10)


# ---------------------------------------------------------------- API fuzzing


def test_schemathesis_fuzzes_the_api_without_a_server_error(server, report):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error, response_schema_conformance

    # Inputs of format "uri" are files: the fuzzer sends data URIs only, so no request ever leaves 127.0.0.1.
    files = [_uri(GOOD_PNG), _uri(_mask()), _uri(b"not an image"), "data:image/png;base64,"]
    schemathesis.openapi.format("uri", st.sampled_from(files))
    schema = schemathesis.openapi.from_path(ROOT / ".cog" / "openapi_schema.json")
    operation = schema["/predictions"]["POST"]
    seen: dict[int, int] = {}

    def shape(case, mode) -> None:
        """Keep valid heavy values cheap on a CPU (few steps, small working size and margins). For positive cases,
        also send an input with its image: Cog's PredictionRequest does not mark `input` required, and
        leave out explicit nulls, which Cog 0.23.1's validator rejects (see the README). Prediction ids
        with a NUL or over 255 bytes are replaced: they hit a bug of Cog's server, tested on its own below."""
        if not isinstance(case.body, dict):
            return
        prediction_id = case.body.get("id")
        if isinstance(prediction_id, str) and ("\0" in prediction_id or len(prediction_id.encode()) > 64):
            case.body["id"] = uuid.uuid4().hex  # such ids wedge Cog 0.23.1's server (tested below)
        inputs = case.body.setdefault("input", {}) if mode is GenerationMode.POSITIVE else case.body.get("input")
        if not isinstance(inputs, dict):
            return
        if mode is GenerationMode.POSITIVE:
            for name in [name for name, value in inputs.items() if value is None]:
                del inputs[name]
            inputs.setdefault("image", files[0])
        # Left out, the default 50 steps on a canvas grown by outpaint_* outran the 60 s timeout on CI.
        inputs.setdefault("num_inference_steps", 2)
        if isinstance(inputs.get("num_inference_steps"), int) and 1 <= inputs["num_inference_steps"] <= 500:
            inputs["num_inference_steps"] = min(inputs["num_inference_steps"], 2)
        for side in ("width", "height"):
            if inputs.get(side) in range(64, 1025, 64):
                inputs[side] = 64
        for name, value in inputs.items():  # a canvas near the pixel limit, in tiles, takes minutes here
            if name.startswith("outpaint_") and isinstance(value, int) and 64 < value <= 2048:
                inputs[name] = 64

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            shape(case, mode)
            server.wait_ready(30)
            for _ in range(100):
                response = case.call(base_url=server.url, timeout=60)
                if response.status_code != 409:
                    break
                time.sleep(0.05)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

        fuzz()
    report(f"schemathesis: 80 generated requests (positive and negative), responses by status {dict(sorted(seen.items()))}")
    assert seen.get(200) and seen.get(422)


@pytest.mark.xfail(strict=True, reason="coglet 0.23.1: an id with a NUL or over 255 bytes takes a prediction slot for good")
@pytest.mark.parametrize("bad_id", ["bad\u0000id", "x" * 256], ids=["NUL", "256 bytes"])
def test_a_bad_prediction_id_does_not_wedge_the_server(tiny_weights, tmp_path, bad_id):
    """Found by the fuzzer. The id never reaches this project's code: Cog's Rust server drops the
    prediction's slot without a final state, for good; once every slot is gone, every later request
    gets 409. When Cog fixes it, this test passes, strict xfail turns that into a failure, and the
    warning in docs/serving.md can go."""
    from cogserver import concurrency_max

    server = CogServer(tiny_weights, log_path=tmp_path / "server.log").start()
    try:
        for index in range(concurrency_max()):  # one per slot
            server.request("POST", "/predictions", {"id": f"{bad_id}{index}", "input": _base()})
        time.sleep(1)
        status, response = server.request("POST", "/predictions", {"input": _base()})
        assert status == 200 and response["status"] == "succeeded", (status, response)
    finally:
        server.stop()
