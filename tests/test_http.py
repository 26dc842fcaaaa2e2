"""The real Cog server (coglet) started from the repo root, driven over HTTP on 127.0.0.1."""

import io
import json
import subprocess
import time
import uuid
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image

from cogserver import MAX_BODY_BYTES, data_uri, decode_data_uri
from conftest import make_mask, make_photo

ROOT = Path(__file__).resolve().parent.parent


def inputs_for(tmp_path, size=(120, 80), **extra):
    image = make_photo(tmp_path / "photo.png", size)
    mask = make_mask(tmp_path / "mask.png", size)
    return {"image": data_uri(image), "mask": data_uri(mask), "num_inference_steps": 2, "width": 64, "height": 64,
            "seed": 3, **extra}


def test_health_check_is_ready_and_openapi_is_the_committed_schema(server):
    assert server.health()["status"] == "READY"
    served = server.get("/openapi.json")
    committed = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    assert served["components"]["schemas"]["Input"] == committed["components"]["schemas"]["Input"]


def test_server_start_logs_no_deprecation_warning(server):
    assert "deprecat" not in server.log_path.read_text(errors="replace").lower()


def test_sync_prediction_with_data_uris(server, tmp_path):
    status, response = server.predict(inputs_for(tmp_path, num_outputs=2))
    assert status == 200, response
    assert response["status"] == "succeeded", response.get("error")
    assert len(response["output"]) == 2
    for uri in response["output"]:
        with Image.open(io.BytesIO(decode_data_uri(uri))) as image:
            assert image.format == "PNG" and image.size == (120, 80)
    assert response["metrics"]["seed"] == 3
    assert "denoising" in response["logs"] and "seed 3" in response["logs"]


def test_a_request_body_is_taken_up_to_cogs_limit_and_refused_with_413_past_it(server, tmp_path):
    """Cog's server reads a body of MAX_BODY_BYTES (cogserver.py, from coglet's source; script/predict checks
    requests against it) and answers 413 to one byte more, as curl sees it; the server keeps serving.
    Data URIs travel in the body, so they are held to it, not to INPAINT_MAX_UPLOAD_BYTES (the README says so)."""
    request = json.dumps({"input": inputs_for(tmp_path)}).encode()
    body = tmp_path / "body.json"
    body.write_bytes(request + b" " * (MAX_BODY_BYTES - len(request)))  # JSON allows trailing whitespace

    def post() -> tuple[str, bytes]:
        for _ in range(100):  # the server's brief 409 after the previous prediction, as server.predict retries it
            result = subprocess.run(
                ["curl", "-sS", "-o", str(tmp_path / "response"), "-w", "%{http_code}", server.url + "/predictions",
                 "-H", "Content-Type: application/json", "--data-binary", f"@{body}"],
                capture_output=True, text=True, timeout=300,
            )
            assert result.returncode == 0, result.stderr
            if result.stdout != "409":
                return result.stdout, (tmp_path / "response").read_bytes()
            time.sleep(0.05)
        raise AssertionError("the server stayed at capacity")

    status, response = post()
    assert status == "200" and json.loads(response)["status"] == "succeeded", response[:500]
    with body.open("ab") as file:
        file.write(b" ")
    assert post() == ("413", b"Failed to buffer the request body: length limit exceeded")
    assert server.health()["status"] == "READY"
    assert server.predict(inputs_for(tmp_path))[1]["status"] == "succeeded"


def test_random_seed_is_logged_and_recorded(server, tmp_path):
    body = inputs_for(tmp_path)
    del body["seed"]
    status, response = server.predict(body)
    assert response["status"] == "succeeded"
    seed = response["metrics"]["seed"]
    assert 0 <= seed < 2**32 and f"seed {seed}" in response["logs"]


def test_whole_number_float_seed_is_accepted(server, tmp_path):
    status, response = server.predict(inputs_for(tmp_path, seed=5.0))
    assert response["status"] == "succeeded", response.get("error")
    assert response["metrics"]["seed"] == 5


def test_out_of_range_values_get_422(server, tmp_path):
    for bad in ({"num_outputs": 5}, {"width": 100}, {"scheduler": "Euler"}, {"guidance_scale": 25}):
        status, response = server.predict(inputs_for(tmp_path, **bad))
        assert status == 422, (bad, response)
        assert next(iter(bad)) in json.dumps(response["detail"])


def test_undecodable_image_fails_naming_the_input_and_the_server_keeps_serving(server, tmp_path):
    body = inputs_for(tmp_path)
    body["image"] = "data:image/png;base64," + "aGVsbG8gd29ybGQ="  # "hello world"
    status, response = server.predict(body)
    assert status == 200 and response["status"] == "failed"
    assert "image could not be read as an image" in response["error"]
    assert "Traceback" not in response["error"] and "/tmp/" not in response["error"]
    server.wait_ready(10)
    status, response = server.predict(inputs_for(tmp_path))
    assert response["status"] == "succeeded"


def test_undecodable_mask_names_the_mask(server, tmp_path):
    body = inputs_for(tmp_path)
    body["mask"] = "data:image/png;base64," + "aGVsbG8gd29ybGQ="
    status, response = server.predict(body)
    assert response["status"] == "failed" and "mask could not be read" in response["error"]


def test_async_prediction_sends_start_and_completed_webhooks(server, tmp_path, webhook):
    prediction_id = f"async-{uuid.uuid4().hex[:8]}"
    server.wait_ready(10)
    status, response = server.request(
        "POST",
        "/predictions",
        {"id": prediction_id, "input": inputs_for(tmp_path), "webhook": webhook.url,
         "webhook_events_filter": ["start", "completed"]},
        {"Prefer": "respond-async"},
    )
    assert status == 202, response
    done = webhook.wait_for(lambda event: event.get("status") == "succeeded", timeout=60)
    assert done["id"] == prediction_id and len(done["output"]) == 1
    assert any(event.get("status") == "processing" for event in webhook.events)  # the start event


def test_cancel_stops_a_running_prediction(server, tmp_path, webhook):
    prediction_id = f"cancel-{uuid.uuid4().hex[:8]}"
    server.wait_ready(10)
    long_run = inputs_for(tmp_path, num_inference_steps=500, width=512, height=512)
    status, response = server.request(
        "POST",
        "/predictions",
        {"id": prediction_id, "input": long_run, "webhook": webhook.url},
        {"Prefer": "respond-async"},
    )
    assert status == 202, response
    # Cancel once denoising has visibly started.
    webhook.wait_for(lambda event: "denoising" in (event.get("logs") or ""), timeout=60)
    started = time.monotonic()
    status, _ = server.request("POST", f"/predictions/{prediction_id}/cancel")
    assert status == 200
    final = webhook.wait_for(lambda event: event.get("status") in ("canceled", "succeeded", "failed"), timeout=30)
    assert final["status"] == "canceled"
    assert time.monotonic() - started < 3  # a step of this run takes ~0.1 s; the webhook adds its own latency
    steps = [int(part.split("/")[0].split("|")[-1].strip()) for part in final.get("logs", "").split("\r") if "/500" in part]
    assert steps and max(steps) < 500  # stopped mid-denoising
    server.wait_ready(30)
    status, response = server.predict(inputs_for(tmp_path))
    assert response["status"] == "succeeded"


def test_fidelity_inputs_through_the_server(server, tmp_path):
    photo = make_photo(tmp_path / "big.png", (900, 700))
    mask = make_mask(tmp_path / "m.png", (900, 700), box=(400, 300, 450, 360))
    base = {"image": data_uri(photo), "mask": data_uri(mask), "num_inference_steps": 2, "seed": 9}
    status, response = server.predict({**base, "output_format": "webp", "output_quality": 70, "mask_blur": 4,
                                       "mask_grow": 3, "mask_padding": 16, "strength": 0.75, "num_outputs": 2})
    assert response["status"] == "succeeded", response.get("error")
    metrics = response["metrics"]
    assert len(metrics["crop_boxes"]) == 1 and metrics["working_size"][0] % 64 == 0
    assert set(metrics["timings"]) >= {"decode", "prepare", "vae_encode", "denoise", "vae_decode", "composite", "encode"}
    for uri in response["output"]:
        assert uri.startswith("data:image/webp")
        assert Image.open(io.BytesIO(decode_data_uri(uri))).size == (900, 700)


def test_png_output_is_bit_identical_outside_the_band_through_the_server(server, tmp_path):
    photo = make_photo(tmp_path / "p.png", (333, 211))
    mask = make_mask(tmp_path / "m.png", (333, 211), box=(100, 50, 180, 120))
    status, response = server.predict({"image": data_uri(photo), "mask": data_uri(mask), "num_inference_steps": 2,
                                       "mask_blur": 8})
    output = Image.open(io.BytesIO(decode_data_uri(response["output"][0]))).convert("RGB")
    assert output.size == (333, 211)
    changed = (np.asarray(output) != np.asarray(Image.open(photo).convert("RGB"))).any(axis=2)
    assert changed[50:121, 100:181].all()
    assert not changed[:40].any() and not changed[130:].any() and not changed[:, :90].any() and not changed[:, 190:].any()


def test_a_16bit_png_comes_back_in_16_bits_through_the_server(server, tmp_path):
    """A 16-bit PNG photo (libpng wrote it; Cog's server sends its data URI on as a file): the output PNG has
    16-bit samples, the photo's own beyond the mask's feather band."""
    samples = np.random.default_rng(2).integers(0, 65536, (90, 130, 3), dtype=np.uint16)
    photo = tmp_path / "deep.png"
    photo.write_bytes(imagecodecs.png_encode(samples))
    mask = make_mask(tmp_path / "m.png", (130, 90), box=(40, 30, 80, 60))
    status, response = server.predict({"image": data_uri(photo), "mask": data_uri(mask), "num_inference_steps": 2})
    assert status == 200 and response["status"] == "succeeded", response
    assert "the image is 16-bit" in response["logs"]
    output = imagecodecs.png_decode(decode_data_uri(response["output"][0]))
    assert output.dtype == np.uint16 and output.shape == samples.shape
    far = np.ones((90, 130), bool)
    far[30 - 9 : 60 + 10, 40 - 9 : 80 + 10] = False
    assert np.array_equal(output[far], samples[far]) and not np.array_equal(output, samples)


def test_transparent_image_without_mask_and_empty_mask(server, tmp_path):
    image = Image.open(make_photo(tmp_path / "p.png", (120, 80))).convert("RGBA")
    alpha = Image.new("L", image.size, 255)
    alpha.paste(0, (30, 20, 60, 50))
    image.putalpha(alpha)
    image.save(tmp_path / "hole.png")
    status, response = server.predict({"image": data_uri(tmp_path / "hole.png"), "num_inference_steps": 2})
    assert response["status"] == "succeeded", response.get("error")
    assert Image.open(io.BytesIO(decode_data_uri(response["output"][0]))).mode == "RGBA"

    Image.new("L", (120, 80), 0).save(tmp_path / "black.png")
    status, response = server.predict({"image": data_uri(tmp_path / "p.png"), "mask": data_uri(tmp_path / "black.png")})
    assert response["status"] == "succeeded" and "returning the image unchanged" in response["logs"]

    status, response = server.predict({"image": data_uri(tmp_path / "p.png")})
    assert response["status"] == "failed" and "mask is missing" in response["error"]


def test_new_inputs_are_validated_by_the_schema(server, tmp_path):
    for bad in ({"mask_blur": 65}, {"mask_grow": -100}, {"strength": 2}, {"output_format": "gif"},
                {"output_quality": 0}, {"mask_padding": -1}):
        status, response = server.predict(inputs_for(tmp_path, **bad))
        assert status == 422, (bad, response)


def test_safety_checker_runs_by_default(server, tmp_path):
    status, response = server.predict(inputs_for(tmp_path, num_outputs=2))
    assert response["metrics"]["nsfw_flagged"] == 0 and response["metrics"]["nsfw_flagged_indices"] == []
    status, response = server.predict(inputs_for(tmp_path, disable_safety_checker=True))
    assert response["status"] == "succeeded" and "nsfw_flagged" not in response["metrics"]


def _tiny(tmp_path, *args):
    import subprocess
    import sys

    from inpaint.weights import manifest_pin

    folder = tmp_path / "weights"
    subprocess.run([sys.executable, str(ROOT / "script" / "make-tiny-weights"), str(folder), *args], check=True)
    return folder, {"INPAINT_WEIGHTS_MANIFEST_SHA256": manifest_pin(folder)}


def test_all_flagged_fails_and_disable_safety_checker_lets_outputs_through(tmp_path):
    from cogserver import CogServer

    weights, trust = _tiny(tmp_path, "--safety", "always")
    with CogServer(weights, log_path=tmp_path / "server.log", env=trust) as flagging:
        status, response = flagging.predict(inputs_for(tmp_path, num_outputs=2))
        assert response["status"] == "failed"
        assert "flagged all 2 output(s) as potentially NSFW" in response["error"]
        assert "try another prompt or seed" in response["error"]
        flagging.wait_ready(10)
        status, response = flagging.predict(inputs_for(tmp_path, num_outputs=2, disable_safety_checker=True))
        assert response["status"] == "succeeded" and len(response["output"]) == 2


def test_missing_checker_weights_fail_setup_unless_the_deployment_turns_it_off(tmp_path):
    import shutil

    import pytest
    from cogserver import CogServer

    weights, trust = _tiny(tmp_path)
    shutil.rmtree(weights / "safety_checker")
    with pytest.raises(RuntimeError, match="safety_checker/.* is missing.*INPAINT_SAFETY_CHECKER=0"):
        CogServer(weights, log_path=tmp_path / "failing.log", env=trust).start().stop()
    server = CogServer(weights, log_path=tmp_path / "off.log", env={"INPAINT_SAFETY_CHECKER": "0", **trust})
    with server:
        assert "the safety checker is off for this deployment" in server.health()["setup"]["logs"]
        status, response = server.predict(inputs_for(tmp_path))
        assert response["status"] == "succeeded" and "nsfw_flagged" not in response["metrics"]
