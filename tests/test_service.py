"""One prediction through inpaint.service with the tiny model: crops, batches, metrics."""

import dataclasses
import logging
import re
import shutil
import time

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageCms, ImageDraw

from conftest import make_mask, make_photo
from inpaint import codec
from inpaint.inputs import check_inputs


def _mask(tmp_path, size, boxes):
    mask = Image.new("L", size, 0)
    for box in boxes:
        ImageDraw.Draw(mask).rectangle(box, fill=255)
    mask.save(tmp_path / "m.png")
    return tmp_path / "m.png"


def test_small_mask_in_a_large_photo_works_on_a_crop_at_native_size(inpainter, tmp_path, caplog):
    photo = make_photo(tmp_path / "big.png", (1600, 1200))
    mask = _mask(tmp_path, (1600, 1200), [(700, 500, 760, 580)])
    start = time.perf_counter()
    with caplog.at_level("INFO", logger="inpaint.service"):
        result = inpainter.inpaint(photo, mask, check_inputs(seed=1, num_inference_steps=2), tmp_path)
    took = time.perf_counter() - start
    (box,) = result.metrics["crop_boxes"]
    width, height = result.metrics["working_size"]
    assert f"working at {width}x{height} on 1 region(s): {[box]}" in caplog.messages  # the prediction's log says so
    assert "seed 1" in caplog.messages and result.metrics["seed"] == 1  # (what a user needs to paint it again)
    left, top, right, bottom = box
    assert left <= 700 - 32 and top <= 500 - 32 and right >= 761 + 32 and bottom >= 581 + 32
    assert (right - left) * (bottom - top) < 0.05 * 1600 * 1200
    width, height = result.metrics["working_size"]
    assert 0.8 < width * height / 512**2 < 1.25  # the crop runs at the model's native area
    assert Image.open(result.paths[0]).size == (1600, 1200)
    stages = ("decode", "prepare", "queue", "text_encode", "vae_encode", "denoise", "vae_decode", "safety", "composite",
              "encode")
    assert set(result.metrics["timings"]) == set(stages)  # these, and no others
    assert all(result.metrics["timings"][stage] > 0 for stage in stages if stage != "queue")  # no one waited
    assert sum(result.metrics["timings"].values()) <= took + 0.001 * len(stages)  # no stage counted twice
    assert all(round(seconds, 4) == seconds for seconds in result.metrics["timings"].values())  # to 0.1 ms
    assert 0 < result.metrics["mask_coverage"] < 0.01


def test_distant_regions_run_as_one_batch_of_crops(inpainter, tmp_path):
    photo = make_photo(tmp_path / "big.png", (2000, 1000))
    mask = _mask(tmp_path, (2000, 1000), [(100, 100, 160, 160), (1800, 800, 1880, 880)])
    result = inpainter.inpaint(photo, mask, check_inputs(seed=1, num_inference_steps=2, num_outputs=2), tmp_path)
    assert len(result.metrics["crop_boxes"]) == 2
    assert len(result.paths) == 2
    original = np.asarray(Image.open(photo).convert("RGB"))
    for path in result.paths:
        changed = (np.asarray(Image.open(path)) != original).any(axis=2)
        assert changed[100:161, 100:161].all() and changed[800:881, 1800:1881].all()
        assert not changed[400:600].any()


def test_all_white_mask_generates_the_whole_image(inpainter, tmp_path):
    photo = make_photo(tmp_path / "p.png", (300, 200))
    Image.new("L", (300, 200), 255).save(tmp_path / "white.png")
    result = inpainter.inpaint(photo, tmp_path / "white.png", check_inputs(seed=1, num_inference_steps=2), tmp_path)
    assert result.metrics["crop_boxes"] == [[0, 0, 300, 200]]
    assert result.metrics["mask_coverage"] == 1.0


def test_explicit_working_size_is_used(inpainter, tmp_path):
    photo = make_photo(tmp_path / "p.png", (300, 200))
    mask = _mask(tmp_path, (300, 200), [(0, 0, 299, 199)])
    result = inpainter.inpaint(photo, mask, check_inputs(seed=1, num_inference_steps=2, width=256, height=128), tmp_path)
    assert result.metrics["working_size"] == [256, 128]


def test_a_large_mask_keeps_every_pixel_beyond_the_feather(inpainter, tmp_path):
    # The whole photo is the crop, and the feather and blend run over many tiles.
    from scipy import ndimage

    photo = make_photo(tmp_path / "p.png", (700, 500))
    mask = _mask(tmp_path, (700, 500), [(60, 40, 640, 450)])
    request = check_inputs(seed=1, num_inference_steps=2, mask_blur=12, num_outputs=2)
    result = inpainter.inpaint(photo, mask, request, tmp_path)
    assert result.metrics["crop_boxes"] == [[0, 0, 700, 500]]
    original = np.asarray(Image.open(photo).convert("RGB"))
    binary = np.asarray(Image.open(mask)) >= 128
    far = ndimage.distance_transform_edt(~binary) > 12
    for path in result.paths:
        output = np.asarray(Image.open(path))
        assert output.shape == original.shape
        assert np.array_equal(output[far], original[far])
        assert (output[binary] != original[binary]).any(axis=-1).mean() > 0.9  # the mask is repainted


def test_setup_logs_where_its_time_went(tiny_weights, tiny_settings, caplog):
    from inpaint.fastpath import FastPath
    from inpaint.safety import SafetyChecker
    from inpaint.service import Inpainter

    with caplog.at_level("INFO", logger="inpaint"):
        inpainter = Inpainter.load(str(tiny_weights), tiny_settings)
    [line] = [message for message in caplog.messages if message.startswith("setup: ")]
    assert re.fullmatch(r"setup: weights \d+\.\d s, safety checker \d+\.\d s, model \d+\.\d s", line), line
    assert f"loading {tiny_weights} on cpu in float32" in caplog.messages
    assert isinstance(inpainter.safety, SafetyChecker)  # the checker is on unless the deployment turns it off
    assert isinstance(inpainter.fast, FastPath) and not inpainter.fast.enabled  # the service owns it; off on the CPU
    assert inpainter.healthy()


def test_setup_with_the_checker_turned_off_says_so_and_loads_none(tiny_weights, tiny_settings, caplog):
    from inpaint.service import Inpainter

    with caplog.at_level("INFO", logger="inpaint"):
        inpainter = Inpainter.load(str(tiny_weights), dataclasses.replace(tiny_settings, safety_checker=False))
    assert inpainter.safety is None
    assert ("the safety checker is off for this deployment (INPAINT_SAFETY_CHECKER=0): no output is checked, and "
            "the disable_safety_checker input has no effect") in caplog.messages
    [line] = [message for message in caplog.messages if message.startswith("setup: ")]
    assert re.fullmatch(r"setup: weights \d+\.\d s, model \d+\.\d s", line), line


def test_setup_trusts_shipped_compiled_parts_only_from_the_images_own_folder(tiny_weights, tiny_settings, tmp_path):
    """Compiled parts are code (docs/fast-path.md): those beside COG_WEIGHTS are loaded only with a pin,
    those in the image's own weights folder without one. Setup hands the fast path the folder and the
    verdict; on a GPU the fast path acts on them (test_artifact.py, with a real bake)."""
    from inpaint.config import Settings
    from inpaint.service import Inpainter
    from inpaint.weights import COMPILED, resolve_weights_ahead

    folder = tmp_path / "weights"
    shutil.copytree(tiny_weights, folder)
    assert Inpainter.load(str(folder), tiny_settings).fast.artifact == (None, False, "")  # none shipped
    (folder / COMPILED).mkdir()
    assert Inpainter.load(str(folder), tiny_settings).fast.artifact == (folder / COMPILED, False, "")
    ahead = resolve_weights_ahead(str(folder), tiny_settings)  # as startup passes it: the image's own, or not
    assert Inpainter.load(ahead, tiny_settings, from_image=True).fast.artifact == (folder / COMPILED, True, "")
    pinned = Settings.from_env({"INPAINT_WEIGHTS_DIR": str(folder), "INPAINT_COMPILED_MANIFEST_SHA256": "ab" * 32,
                                "INPAINT_WEIGHTS_MANIFEST_SHA256": tiny_settings.weights_manifest_sha256})
    assert Inpainter.load(None, pinned).fast.artifact == (folder / COMPILED, True, "ab" * 32)


def test_a_sticky_gpu_error_leaves_the_service_unhealthy_and_refusing(inpainter, tmp_path, monkeypatch, caplog):
    """torch's own message for a CUDA error that poisons the process (tests/faulty_predict.py): the
    service reports unhealthy from then on, and refuses each request with what to do."""
    from faulty_predict import CUDA_FAULT
    from inpaint import pipeline
    from inpaint.service import DeviceFailed, Inpainter

    def faulty(*args, **kwargs):
        raise RuntimeError(CUDA_FAULT)

    def failing(*args, **kwargs):
        raise RuntimeError("a failure the GPU recovers from")

    released = []
    monkeypatch.setattr(pipeline, "release_memory", lambda device, fast=None: released.append((device, fast)))
    monkeypatch.setattr(pipeline, "generate", failing)
    served = Inpainter(inpainter.pipe, inpainter.settings, inpainter.safety, inpainter.fast)
    photo, mask = make_photo(tmp_path / "p.png"), make_mask(tmp_path / "m.png")
    with pytest.raises(RuntimeError, match="recovers"):
        served.inpaint(photo, mask, check_inputs(num_inference_steps=2), tmp_path)
    assert served.healthy() and released == [(inpainter.pipe.device, inpainter.fast)]  # memory handed back
    monkeypatch.setattr(pipeline, "generate", faulty)
    with caplog.at_level("ERROR", logger="inpaint.service"), pytest.raises(RuntimeError, match="illegal memory access"):
        served.inpaint(photo, mask, check_inputs(num_inference_steps=2), tmp_path)
    assert not served.healthy()
    assert len(released) == 1  # after a sticky error every CUDA call fails: none is made
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == [
        "the GPU failed beyond recovery (an illegal memory access was encountered): this container now reports UNHEALTHY"
    ]
    with pytest.raises(DeviceFailed) as refused:
        served.inpaint(photo, mask, check_inputs(num_inference_steps=2), tmp_path)
    assert str(refused.value) == (
        "this container's GPU failed beyond recovery earlier (an illegal memory access was encountered) and it "
        "reports UNHEALTHY; send the request to another replica, or restart the container"
    )


def test_gpu_out_of_memory_fails_with_advice_and_the_next_prediction_succeeds(inpainter, tmp_path, monkeypatch):
    from inpaint.service import GPUOutOfMemory

    photo, mask = make_photo(tmp_path / "p.png"), make_mask(tmp_path / "m.png")
    released = []
    monkeypatch.setattr("inpaint.pipeline.release_memory", lambda device, fast=None: released.append((device, fast)))
    unet = inpainter.pipe.unet

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(unet, "forward", out_of_memory)
    request = check_inputs(seed=1, num_inference_steps=2, num_outputs=4, width=128, height=64)
    with pytest.raises(GPUOutOfMemory) as error:
        inpainter.inpaint(photo, mask, request, tmp_path)
    assert str(error.value) == ("the GPU ran out of memory painting 4 output(s) x 1 region(s) at 128x64; lower "
                                "num_outputs or width/height and try again")
    assert released == [(inpainter.pipe.device, inpainter.fast)], "memory was not released"
    monkeypatch.undo()
    assert len(inpainter.inpaint(photo, mask, request, tmp_path).paths) == 4


def test_a_file_that_is_no_image_is_named_as_the_input_it_came_in(inpainter, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    photo, mask = make_photo(tmp_path / "p.png"), make_mask(tmp_path / "m.png")
    for image_path, mask_path, name in ((junk, mask, "image"), (photo, junk, "mask")):
        with pytest.raises(ValueError) as refused:
            inpainter.inpaint(image_path, mask_path, check_inputs(seed=1, num_inference_steps=1), tmp_path)
        assert str(refused.value).startswith(f"{name} "), str(refused.value)


def test_output_quality_reaches_the_lossy_encoders(inpainter, tmp_path):
    photo, mask = make_photo(tmp_path / "p.png"), make_mask(tmp_path / "m.png")
    for output_format in ("jpg", "webp"):
        sizes = []
        for quality in (10, 95):
            request = check_inputs(seed=1, num_inference_steps=1, output_format=output_format, output_quality=quality)
            out = tmp_path / f"{output_format}-{quality}"
            out.mkdir()
            sizes.append(inpainter.inpaint(photo, mask, request, out).paths[0].stat().st_size)
        assert sizes[0] < sizes[1], (output_format, sizes)


def test_the_empty_negative_prompt_is_encoded_once_then_reused(inpainter, tmp_path):
    """Without a negative prompt, the text encoder runs for the prompt alone once the empty one's
    embedding is made (pipeline.EmptyPrompt; test_differential.py checks it is diffusers' own)."""
    from inpaint.service import Inpainter

    served = Inpainter(inpainter.pipe, inpainter.settings, inpainter.safety, inpainter.fast)  # nothing cached yet
    photo, mask = make_photo(tmp_path / "p.png"), make_mask(tmp_path / "m.png")
    encoded = []
    hook = inpainter.pipe.text_encoder.register_forward_hook(lambda module, args, output: encoded.append(1))
    try:
        for negative_prompt in (None, None, "blurry"):
            served.inpaint(photo, mask, check_inputs(seed=1, num_inference_steps=1, width=64, height=64,
                                                     negative_prompt=negative_prompt), tmp_path)
            encoded.append("|")
    finally:
        hook.remove()
    assert "".join(map(str, encoded)) == "11|1|11|"  # prompt and empty; prompt; prompt and negative prompt


def test_a_prompt_longer_than_the_model_reads_is_logged_as_cut(inpainter, tmp_path, caplog):
    photo, mask = make_photo(tmp_path / "p.png"), make_mask(tmp_path / "m.png")
    request = check_inputs(prompt="red " * 100, negative_prompt="blue " * 90, seed=1, num_inference_steps=1, width=64, height=64)
    with caplog.at_level("WARNING", logger="inpaint.service"):
        inpainter.inpaint(photo, mask, request, tmp_path)
    assert [record.getMessage() for record in caplog.records if record.name == "inpaint.service"] == [
        "prompt is 100 tokens; the model reads only the first 75, the rest is ignored",
        "negative_prompt is 90 tokens; the model reads only the first 75, the rest is ignored",
    ]
    caplog.clear()
    request = check_inputs(prompt="red " * 75, seed=1, num_inference_steps=1, width=64, height=64)
    with caplog.at_level("WARNING", logger="inpaint.service"):
        inpainter.inpaint(photo, mask, request, tmp_path)
    assert not caplog.records  # 75 tokens: all read


def test_an_empty_mask_or_no_strength_returns_the_photo_and_the_log_says_why(inpainter, tmp_path, caplog):
    photo = make_photo(tmp_path / "p.png")
    empty = _mask(tmp_path, (200, 120), []).rename(tmp_path / "empty.png")
    whole = _mask(tmp_path, (200, 120), [(0, 0, 199, 119)])
    for mask, inputs, reason in ((empty, {}, "the mask is empty"), (whole, {"strength": 0.0}, "strength is 0")):
        caplog.clear()
        with caplog.at_level("INFO", logger="inpaint.service"):
            result = inpainter.inpaint(photo, mask, check_inputs(seed=1, num_inference_steps=2, **inputs), tmp_path)
        assert f"{reason}: returning the image unchanged without running the model" in caplog.messages
        assert result.metrics["mask_coverage"] == (0.0 if mask == empty else 1.0)
        assert np.array_equal(np.asarray(Image.open(result.paths[0]).convert("RGB")), np.asarray(Image.open(photo).convert("RGB")))


def _deep_and_shallow(tmp_path, size, channels, seed=0, fmt="png"):
    """A 16-bit PNG (written by libpng) or TIFF (tifffile) photo of noise, and its 8-bit reduction as an 8-bit PNG."""
    samples = np.random.default_rng(seed).integers(0, 65536, (size[1], size[0], channels), dtype=np.uint16)
    deep, shallow = tmp_path / f"deep.{fmt}", tmp_path / "shallow.png"
    if fmt == "png":
        deep.write_bytes(imagecodecs.png_encode(samples))
    else:
        tifffile.imwrite(deep, samples, photometric="rgb", compression="zlib")
    Image.fromarray(codec.reduce_to_8bit(samples)).save(shallow)
    return deep, shallow, samples


@pytest.mark.parametrize("channels, margins, fmt", [(3, {}, "png"), (4, {}, "png"), (3, {"outpaint_left": 40, "outpaint_down": 24}, "png"),
                                                    (3, {}, "tif")],
                         ids=["RGB", "RGBA", "outpainting", "TIFF"])
def test_a_16bit_photo_keeps_its_16_bits_where_the_painting_left_it(inpainter, tmp_path, caplog, channels, margins, fmt):
    """The model paints the photo's 8-bit reduction, exactly as it paints that reduction sent as an 8-bit PNG
    (same seed): the 16-bit output reduced to 8 bits is that output, byte for byte, and every pixel the
    painting left as it was (all beyond the feather, at least) keeps the photo's 16 bits. Read back by libpng."""
    deep, shallow, samples = _deep_and_shallow(tmp_path, (200, 120), channels, fmt=fmt)
    mask = make_mask(tmp_path / "mask.png")
    request = check_inputs(seed=5, num_inference_steps=2, num_outputs=2, **margins)
    (tmp_path / "deep-out").mkdir(), (tmp_path / "shallow-out").mkdir()
    with caplog.at_level("INFO", logger="inpaint.service"):
        deep_result = inpainter.inpaint(deep, mask, request, tmp_path / "deep-out")
    assert ("the image is 16-bit: the output PNG keeps its 16 bits wherever the painting leaves a pixel as it was"
            in caplog.messages)
    shallow_result = inpainter.inpaint(shallow, mask, request, tmp_path / "shallow-out")
    assert deep_result.metrics["crop_boxes"] == shallow_result.metrics["crop_boxes"]
    assert deep_result.metrics["timings"].keys() == shallow_result.metrics["timings"].keys()  # its work in their stages
    left, top = margins.get("outpaint_left", 0), 0
    for deep_path, shallow_path in zip(deep_result.paths, shallow_result.paths, strict=True):
        output = imagecodecs.png_decode(deep_path.read_bytes())
        expected = imagecodecs.png_decode(shallow_path.read_bytes())
        assert output.dtype == np.uint16 and np.array_equal(codec.reduce_to_8bit(output), expected)
        photo = output[top : top + 120, left : left + 200]
        left_alone = (expected[top : top + 120, left : left + 200] == codec.reduce_to_8bit(samples)).all(axis=2)
        assert np.array_equal(photo[left_alone], samples[left_alone])
        far = np.ones((120, 200), bool)
        far[30 - 9 : 60 + 10, 50 - 9 : 100 + 10] = False  # the mask's box grown by the feather (mask_blur 8) and a pixel
        if margins:  # and the feather into the photo from the margins, left and below
            far[:, :9] = far[-9:] = False
        assert left_alone[far].all() and not left_alone.all()


def test_a_16bit_png_photo_with_a_lossy_output_is_its_8bit_reduction_painted(inpainter, tmp_path, caplog):
    deep, shallow, _ = _deep_and_shallow(tmp_path, (200, 120), 3)
    mask = make_mask(tmp_path / "mask.png")
    request = check_inputs(seed=5, num_inference_steps=2, output_format="webp")
    (tmp_path / "deep-out").mkdir(), (tmp_path / "shallow-out").mkdir()
    with caplog.at_level("INFO", logger="inpaint.service"):
        [deep_path] = inpainter.inpaint(deep, mask, request, tmp_path / "deep-out").paths
    assert "the image is 16-bit, and a webp output holds 8: ask for png to keep 16" in caplog.messages
    [shallow_path] = inpainter.inpaint(shallow, mask, request, tmp_path / "shallow-out").paths
    assert deep_path.read_bytes() == shallow_path.read_bytes()


def test_a_16bit_png_photo_with_nothing_to_paint_comes_back_as_it_was(inpainter, tmp_path):
    deep, _, samples = _deep_and_shallow(tmp_path, (64, 48), 4)
    empty = _mask(tmp_path, (64, 48), [])
    [path] = inpainter.inpaint(deep, empty, check_inputs(seed=1, num_inference_steps=2), tmp_path).paths
    assert np.array_equal(imagecodecs.png_decode(path.read_bytes()), samples)


@pytest.mark.parametrize("output_format", ["png", "webp", "jpg"])
def test_every_output_carries_the_photos_colour_profile(inpainter, tmp_path, output_format):
    """A photo in another colour space than sRGB (here LittleCMS' sRGB profile stands for one) is painted in
    its own pixel values, and each output says what they mean with the same profile."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    photo = tmp_path / "tagged.jpg"
    Image.open(make_photo(tmp_path / "p.png")).save(photo, quality=95, icc_profile=profile)
    request = check_inputs(seed=1, num_inference_steps=2, num_outputs=2, output_format=output_format)
    result = inpainter.inpaint(photo, make_mask(tmp_path / "m.png"), request, tmp_path)
    assert len(result.paths) == 2
    for path in result.paths:
        assert Image.open(path).info["icc_profile"] == profile
