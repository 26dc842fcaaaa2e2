"""Several predictions at once: the parts (inpaint/concurrency.py), the Inpainter from threads, and the
contract through Cog's real server (N at once, the N+1-th refused, cancel, webhooks, faults, health)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch

from cogserver import concurrency_max, data_uri, decode_data_uri
from conftest import PREDICT_DEFAULTS, make_mask, make_photo
from faulty_predict import CUDA_FAULT, FAULT_PROMPT
from inpaint import pipeline
from inpaint.concurrency import Cancelled, CancelToken, DeviceQueue, OutputFolders, run_cancellable
from inpaint.inputs import check_inputs
from inpaint.service import DeviceFailed, GPUOutOfMemory, Inpainter

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- the parts


def _token(age: int) -> CancelToken:
    token = CancelToken()
    token.age = age
    return token


def _served(queue: DeviceQueue, asking: list[tuple[str, CancelToken]]) -> list[str]:
    """The order in which `asking` (name, token), each in line before the next asks, get their turn once the
    turn `queue` is held in now is released."""
    order, threads = [], []

    def wait(name, token):
        with queue.turn(token):
            order.append(name)

    for name, token in asking:
        threads.append(threading.Thread(target=wait, args=(name, token)))
        threads[-1].start()
        while queue.waiting < len(threads):
            time.sleep(0.01)
    queue.release()
    for thread in threads:
        thread.join(5)
    return order


def test_device_queue_gives_the_turn_to_the_oldest_request_waiting():
    queue = DeviceQueue()
    queue.acquire(_token(0))
    assert _served(queue, [(age, _token(age)) for age in (3, 1, 2)]) == [1, 2, 3]  # asked in this order; served by age


def test_a_request_made_earlier_goes_first_though_it_asks_later():
    """A token's age is when its request was made: an outpainting that made its token first and asks again for
    its next tile is not overtaken by a request made after it that asked in between."""
    queue = DeviceQueue()
    earlier = CancelToken()
    time.sleep(0.001)
    later = CancelToken()
    queue.acquire(_token(0))
    assert _served(queue, [("later", later), ("earlier", earlier)]) == ["earlier", "later"]


def test_a_cancelled_waiter_leaves_the_line_and_the_next_one_gets_the_turn():
    queue = DeviceQueue()
    queue.acquire(_token(0))
    cancelled, next_one = _token(1), _token(2)
    outcome = {}

    def wait(name, token):
        try:
            with queue.turn(token):
                outcome[name] = "turn"
        except Cancelled as error:
            outcome[name] = str(error)

    threads = [threading.Thread(target=wait, args=(name, token)) for name, token in (("a", cancelled), ("b", next_one))]
    for thread in threads:
        thread.start()
    while queue.waiting < 2:
        time.sleep(0.01)
    cancelled.cancel()
    while queue.waiting > 1:
        time.sleep(0.01)
    queue.release()
    for thread in threads:
        thread.join(5)
    assert outcome == {"a": "the prediction was cancelled", "b": "turn"} and queue.waiting == 0


def test_run_cancellable_sets_the_token_and_waits_for_the_thread_before_cancelling():
    ended = threading.Event()

    def work(token: CancelToken) -> str:
        while not token.cancelled:
            time.sleep(0.01)
        time.sleep(0.2)  # the last step after the check
        ended.set()
        token.check()
        return "not reached"

    async def main():
        task = asyncio.ensure_future(run_cancellable(work))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return ended.is_set()

    assert asyncio.run(main())  # the thread had ended when the cancellation arrived


def test_run_cancellable_returns_the_result_and_passes_errors_on():
    assert asyncio.run(run_cancellable(lambda token: 42)) == 42
    with pytest.raises(ValueError, match="bad"):
        asyncio.run(run_cancellable(lambda token: (_ for _ in ()).throw(ValueError("bad"))))


def test_output_folders_outlive_their_run_by_the_grace_period():
    folders = OutputFolders(grace_seconds=0.3)
    with folders.folder() as first:
        (first / "out-0.png").write_bytes(b"x")
    with folders.folder() as second:
        assert first.exists()  # returned moments ago: the server may still be reading it
    time.sleep(0.35)
    with folders.folder() as third:
        assert not first.exists() and not second.exists() and third.exists()


def test_output_folders_still_in_their_grace_go_when_the_process_ends():
    """Before, a server stopped after a busy minute left that minute's outputs in /tmp for good."""
    script = ("from inpaint.concurrency import OutputFolders\n"
              "folders = OutputFolders()\n"
              "for _ in range(3):\n"
              "    with folders.folder() as path:\n"
              "        (path / 'out-0.png').write_bytes(b'x')\n"
              "        print(path)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    made = [Path(line) for line in run.stdout.split()]
    assert len(made) == 3 and not any(path.exists() for path in made)


def test_output_folders_still_in_their_grace_go_with_their_owner_quietly_even_one_already_gone(monkeypatch):
    """In process, as above at exit (mutation testing sees only this one)."""
    import gc

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # where an error of a finalizer goes
    folders = OutputFolders()
    made = []
    for _ in range(3):
        with folders.folder() as path:
            (path / "out-0.png").write_bytes(b"x")
            made.append(path)
    shutil.rmtree(made[1])  # a cleaner of /tmp, an operator
    del folders
    gc.collect()
    assert not any(path.exists() for path in made) and unraisable == []


def test_an_output_folder_removed_by_someone_else_does_not_fail_the_next_prediction(tmp_path):
    """A folder gone before its grace ends (a cleaner of /tmp, an operator) is not an error when it expires."""
    folders = OutputFolders(grace_seconds=0)
    with folders.folder() as first:
        pass
    shutil.rmtree(first)
    with folders.folder() as second:
        assert second.is_dir()


# ---------------------------------------------------------------- the Inpainter from threads


def _request(**overrides):
    settings = dict(PREDICT_DEFAULTS, prompt="a red boat", mask_blur=4, mask_padding=16, width=128, height=128,
                    num_inference_steps=4, scheduler="DDIM", seed=5)
    return check_inputs(**{**settings, **overrides})


def _digest(paths) -> list[str]:
    return [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in paths]


def test_a_result_does_not_depend_on_what_runs_beside_it(inpainter, tmp_path):
    photo, mask = make_photo(tmp_path / "photo.png"), make_mask(tmp_path / "mask.png")
    requests = [_request(seed=seed, prompt=f"prompt {seed}", num_inference_steps=3 + seed % 3) for seed in range(4)]
    alone = []
    for index, request in enumerate(requests):
        out = tmp_path / f"alone-{index}"
        out.mkdir()
        alone.append(_digest(inpainter.inpaint(photo, mask, request, out).paths))
    together: dict[int, list[str]] = {}

    def run(index):
        out = tmp_path / f"together-{index}"
        out.mkdir()
        together[index] = _digest(inpainter.inpaint(photo, mask, requests[index], out).paths)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [together[index] for index in range(4)] == alone


def test_counting_a_prompts_tokens_beside_a_running_model_leaves_the_models_tokens_padded(inpainter):
    """The model encodes prompts padded to 77 tokens in one request's turn while another request counts its
    prompt's tokens outside it. On one shared tokenizer that unpadded the model's tokens ("Sizes of tensors
    must match ... 77", seen under load through the server)."""
    shapes, stop = [], threading.Event()

    def encode():
        for index in range(1500):
            ids = inpainter.pipe.tokenizer(["a photo of a dog " * (index % 3)] * 2, padding="max_length", max_length=77,
                                           truncation=True, return_tensors="pt").input_ids
            shapes.append(tuple(ids.shape))
        stop.set()

    def count():
        while not stop.is_set():
            inpainter._log_truncation("prompt", "a photo of a cat " * 30)

    threads = [threading.Thread(target=encode), threading.Thread(target=count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert set(shapes) == {(2, 77)}


def test_a_cancelled_request_stops_between_steps_and_frees_the_device(inpainter, tmp_path):
    photo, mask = make_photo(tmp_path / "photo.png"), make_mask(tmp_path / "mask.png")
    token, steps = CancelToken(), []
    check = token.check

    def counting_check():
        steps.append(1)
        if len(steps) == 2:
            token.cancel()
        check()

    token.check = counting_check
    denoised = []
    hook = inpainter.pipe.unet.register_forward_hook(lambda module, args, output: denoised.append(1))
    try:
        with pytest.raises(Cancelled):
            inpainter.inpaint(photo, mask, _request(num_inference_steps=50), tmp_path, token)
    finally:
        hook.remove()
    assert len(steps) <= 4  # a check before the model, then one per step: stopped at the second step
    assert len(denoised) <= 2  # not the 50 steps asked for
    assert inpainter.device.waiting == 0
    assert inpainter.inpaint(photo, mask, _request(), tmp_path).paths  # the device was released


def test_an_out_of_memory_error_fails_only_the_request_that_caused_it(inpainter, tmp_path, monkeypatch):
    photo, mask = make_photo(tmp_path / "photo.png"), make_mask(tmp_path / "mask.png")
    generate = pipeline.generate

    def generate_or_run_out(pipe, images, masks, job, **kwargs):
        if job.prompt == "too big":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return generate(pipe, images, masks, job, **kwargs)

    monkeypatch.setattr(pipeline, "generate", generate_or_run_out)
    outcome = {}

    def run(name, request):
        try:
            out = tmp_path / name
            out.mkdir()
            outcome[name] = len(inpainter.inpaint(photo, mask, request, out).paths)
        except GPUOutOfMemory as error:
            outcome[name] = str(error)

    threads = [threading.Thread(target=run, args=("ok-1", _request(seed=1))),
               threading.Thread(target=run, args=("big", _request(prompt="too big"))),
               threading.Thread(target=run, args=("ok-2", _request(seed=2)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert outcome["ok-1"] == 1 and outcome["ok-2"] == 1
    assert "ran out of memory" in outcome["big"] and "lower num_outputs" in outcome["big"]
    assert inpainter.healthy()  # out of memory is not a fault of the GPU


def test_a_sticky_cuda_error_makes_the_container_unhealthy_and_later_requests_fail_fast(inpainter, tmp_path,
                                                                                       monkeypatch):
    photo, mask = make_photo(tmp_path / "photo.png"), make_mask(tmp_path / "mask.png")
    faulty = Inpainter(inpainter.pipe, inpainter.settings, inpainter.safety)  # its own health, the same model
    monkeypatch.setattr(pipeline, "generate", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError(CUDA_FAULT)))
    assert faulty.healthy()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        faulty.inpaint(photo, mask, _request(), tmp_path)
    assert not faulty.healthy()
    # Fast: refused before any work, so a photo that does not exist is never read.
    with pytest.raises(DeviceFailed, match="restart the container"):
        faulty.inpaint(tmp_path / "never-read.png", tmp_path / "never-read-either.png", _request(), tmp_path)
    assert faulty.device.waiting == 0
    assert inpainter.healthy()


def test_other_runtime_errors_leave_the_container_healthy(inpainter, tmp_path, monkeypatch):
    photo, mask = make_photo(tmp_path / "photo.png"), make_mask(tmp_path / "mask.png")
    other = Inpainter(inpainter.pipe, inpainter.settings, inpainter.safety)
    monkeypatch.setattr(pipeline, "generate", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError):
        other.inpaint(photo, mask, _request(), tmp_path)
    assert other.healthy()


# ---------------------------------------------------------------- through Cog's real server

SLOTS = concurrency_max()


def _inputs(tmp_path, **overrides) -> dict:
    photo, mask = make_photo(tmp_path / "photo.png", size=(96, 64)), make_mask(tmp_path / "mask.png", size=(96, 64))
    return {"image": data_uri(photo), "mask": data_uri(mask), "width": 64, "height": 64, "num_inference_steps": 2,
            "seed": 1, **overrides}


def _start(server, webhook, body: dict, prediction_id: str, events=None) -> int:
    payload = {"id": prediction_id, "input": body, "webhook": webhook.url}
    if events:
        payload["webhook_events_filter"] = events
    status, _ = server.request("POST", "/predictions", payload, {"Prefer": "respond-async"})
    return status


def _final(webhook, prediction_id: str, timeout: float = 120) -> dict:
    return webhook.wait_for(
        lambda event: event.get("id") == prediction_id and event.get("status") in ("succeeded", "failed", "canceled"),
        timeout,
    )


def _cancel_outcome(final: dict) -> str | None:
    """What a cancelled prediction's final webhook says befell it: one of the outcomes of coglet 0.23.1's
    cancel race (docs/serving.md), or None for any other. Cancelled while Cog's server still prepares the
    inputs, it ends "failed" with an empty "Input validation error: " and run() never starts; while the
    server hands run() to the event loop, "failed" with "Failed to submit coroutine" at once; just after,
    before the server holds run()'s task, the cancel never reaches run(), and the prediction ends
    "failed" with an empty CancelationException, at once or once run() is done, or "canceled" once run()
    is done. A failure names the step of the server's that the CancelationException hit. Whether run()
    ran to its end is told by its logs' last denoising step."""
    status, error, logs = final["status"], final.get("error") or "", final.get("logs") or ""
    end = " after running to its end" if "denoising: 100%" in logs else ""
    if status in ("succeeded", "canceled"):
        return status + end
    if status != "failed":
        return None
    if error.startswith("Input validation error") and not logs:
        return "failed before run()"
    if error.startswith("Prediction failed: ") and error.endswith(": CancelationException: "):  # the step it hit
        return f"failed ({error[len('Prediction failed: '):-len(': CancelationException: ')]})" + end
    return None


def test_the_default_concurrency_is_more_than_one():
    assert SLOTS >= 2


def test_n_predictions_run_at_once_and_the_next_one_gets_409(server, tmp_path, webhook):
    server.wait_ready(30)
    ids = [f"slot-{index}-{uuid.uuid4().hex[:6]}" for index in range(SLOTS)]
    for index, prediction_id in enumerate(ids):
        body = _inputs(tmp_path, num_inference_steps=150, width=256, height=256, seed=index)
        assert _start(server, webhook, body, prediction_id) == 202
    for prediction_id in ids:  # each has started (its start webhook); they run one after the other on the model
        webhook.wait_for(lambda event, pid=prediction_id: event.get("id") == pid and event.get("status") == "processing", 60)
    status, response = server.request("POST", "/predictions", {"input": _inputs(tmp_path)})
    refused = _start(server, webhook, _inputs(tmp_path), "refused")
    assert status == 409 and "At capacity" in response["error"]
    assert refused == 409
    finals = [_final(webhook, prediction_id) for prediction_id in ids]
    assert [final["status"] for final in finals] == ["succeeded"] * SLOTS
    assert not any(event.get("id") == "refused" for event in webhook.events)  # refused, so never started


def test_concurrent_predictions_keep_their_own_logs_metrics_and_bytes(server, tmp_path):
    bodies = [_inputs(tmp_path, seed=100 + index, prompt=f"prompt number {index}", num_inference_steps=6)
              for index in range(SLOTS)]
    alone = []
    for body in bodies:
        server.wait_ready(30)
        status, response = server.predict(body)
        alone.append(response["output"])
    together: dict[int, dict] = {}

    def run(index):
        together[index] = server.predict(bodies[index])[1]

    threads = [threading.Thread(target=run, args=(index,)) for index in range(SLOTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for index, body in enumerate(bodies):
        response = together[index]
        assert response["status"] == "succeeded"
        assert response["metrics"]["seed"] == body["seed"]
        logs = response["logs"]
        assert f"seed {body['seed']}" in logs
        assert not any(f"seed {other['seed']}" in logs for other in bodies if other is not body)
        assert logs.count("working at") == 1
        assert [decode_data_uri(uri) for uri in response["output"]] == [decode_data_uri(uri) for uri in alone[index]]


def test_cancelling_one_prediction_cancels_only_that_one(server, tmp_path, webhook):
    server.wait_ready(30)
    keep, cancel = f"keep-{uuid.uuid4().hex[:6]}", f"cancel-{uuid.uuid4().hex[:6]}"
    assert _start(server, webhook, _inputs(tmp_path, num_inference_steps=30, width=256, height=256), keep) == 202
    assert _start(server, webhook, _inputs(tmp_path, num_inference_steps=300, width=256, height=256), cancel) == 202
    webhook.wait_for(lambda event: event.get("id") == cancel and "denoising" in (event.get("logs") or ""), 60)
    started = time.monotonic()
    assert server.request("POST", f"/predictions/{cancel}/cancel")[0] == 200
    assert _final(webhook, cancel, 30)["status"] == "canceled"
    assert time.monotonic() - started < 5
    assert _final(webhook, keep)["status"] == "succeeded"
    server.wait_ready(30)
    assert server.predict(_inputs(tmp_path))[1]["status"] == "succeeded"


def test_a_cancel_storm_loses_nothing_and_the_server_keeps_serving(server, tmp_path, webhook):
    """Rounds of predictions cancelled at once, while waiting for the model, in it, or already done: each
    accepted one ends with a final webhook, and the server serves the next prediction."""
    accepted = []
    for round_ in range(4):
        ids = [f"storm-{round_}-{index}-{uuid.uuid4().hex[:6]}" for index in range(SLOTS)]
        for index, prediction_id in enumerate(ids):
            body = _inputs(tmp_path, seed=index, num_inference_steps=(2, 60, 200)[index % 3], width=128, height=128)
            if _start(server, webhook, body, prediction_id, ["completed"]) == 202:
                accepted.append(prediction_id)
        time.sleep(0.05 * round_)
        for prediction_id in ids:
            server.request("POST", f"/predictions/{prediction_id}/cancel")
        for prediction_id in ids:
            if prediction_id in accepted:
                final = _final(webhook, prediction_id, 60)
                assert _cancel_outcome(final), (final.get("error"), final.get("logs", "")[-500:])
    assert len(accepted) >= 4 * SLOTS - 4  # a few 409s while a slot is being freed
    server.wait_ready(30)
    assert server.predict(_inputs(tmp_path))[1]["status"] == "succeeded"


def test_a_cancel_at_any_moment_of_a_predictions_start_ends_in_one_of_the_known_outcomes(server, tmp_path, webhook,
                                                                                       report):
    """Cancels sent 0-30 ms after the 202, across the windows of Cog's server's start (docs/serving.md):
    each ends with a final webhook in one of the known outcomes, and the server serves the next
    prediction. CANCEL_RACE_SECONDS sets how long it goes on; docs/serving.md's counts are a 300 s run."""
    seconds = float(os.environ.get("CANCEL_RACE_SECONDS", "20"))
    body = _inputs(tmp_path, num_inference_steps=200, width=128, height=128)  # seconds: a cancel that takes ends it
    outcomes: Counter[str] = Counter()
    server.wait_ready(30)
    started, sent = time.monotonic(), 0
    while time.monotonic() - started < seconds:
        prediction_id = f"race-{sent}-{uuid.uuid4().hex[:6]}"
        assert _start(server, webhook, body, prediction_id, ["completed"]) == 202
        time.sleep(sent % 61 * 0.0005)
        sent += 1
        server.request("POST", f"/predictions/{prediction_id}/cancel")
        final = _final(webhook, prediction_id, 60)
        outcome = _cancel_outcome(final)
        assert outcome, (final["status"], final.get("error"), final.get("logs", "")[-500:])
        outcomes[outcome] += 1
        server.wait_ready(30)
    report(f"cancel race: {sent} predictions cancelled 0-30 ms after their 202: "
           + ", ".join(f"{count} {outcome}" for outcome, count in outcomes.most_common()))
    assert outcomes["canceled"]  # most cancels take
    assert server.predict(_inputs(tmp_path))[1]["status"] == "succeeded"


def test_every_accepted_async_prediction_ends_with_its_webhook_under_load(server, tmp_path, webhook):
    accepted, refused = [], 0
    for index in range(12):
        prediction_id = f"load-{index}-{uuid.uuid4().hex[:6]}"
        body = _inputs(tmp_path, seed=index)
        if index % 4 == 3:
            body["image"] = "data:image/png;base64," + "QUJD"  # not an image: fails with a reason
        status = _start(server, webhook, body, prediction_id, ["completed"])
        if status == 202:
            accepted.append((prediction_id, index % 4 == 3))
        else:
            assert status == 409
            refused += 1
        time.sleep(0.02)
    assert len(accepted) >= SLOTS
    for prediction_id, broken in accepted:
        final = _final(webhook, prediction_id)
        assert final["status"] == ("failed" if broken else "succeeded"), final.get("error")
        if broken:
            assert "image could not be read" in final["error"]


def test_health_check_turns_unhealthy_after_a_sticky_cuda_error(faulty_server, tmp_path):
    server = faulty_server
    status, response = server.predict(_inputs(tmp_path, prompt=FAULT_PROMPT))
    # (the fault may have been injected already by another test on this session's faulty server)
    assert response["status"] == "failed"
    assert "illegal memory access" in response["error"] or "failed beyond recovery" in response["error"]
    deadline = time.monotonic() + 30
    while server.health()["status"] != "UNHEALTHY" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.health()["status"] == "UNHEALTHY"
    status, response = server.predict(_inputs(tmp_path))  # fails fast, saying what to do
    assert response["status"] == "failed" and "restart the container" in response["error"]
