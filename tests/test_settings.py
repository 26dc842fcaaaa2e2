"""Each deployment setting, set as the deployment sets it (an INPAINT_* environment variable), reaches
the code: a request the default allows is refused, or the other way round."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from inpaint.config import Settings
from inpaint.inputs import check_inputs
from inpaint.service import Inpainter


def _files(tmp_path, size=(200, 120), fmt="PNG", **save):
    photo = tmp_path / f"photo.{fmt.lower()}"
    Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(photo, fmt, **save)
    mask = tmp_path / "mask.png"
    pixels = np.zeros((size[1], size[0]), np.uint8)
    pixels[size[1] // 4 : size[1] // 2, size[0] // 4 : size[0] // 2] = 255
    Image.fromarray(pixels).save(mask)
    return photo, mask


def _predict(inpainter, environ: dict, tmp_path, photo, mask, **inputs):
    served = Inpainter(inpainter.pipe, Settings.from_env(environ), None)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    request = check_inputs(num_inference_steps=1, seed=0, **inputs)
    return served.inpaint(photo, mask, request, out)


@pytest.mark.parametrize("variable, value, refusal, files, inputs", [
    ("INPAINT_MAX_INPUT_PIXELS", "10000", "over the limit of 10,000", {}, {}),
    ("INPAINT_MAX_UPLOAD_BYTES", "1000", "over the limit of 1,000 (INPAINT_MAX_UPLOAD_BYTES)", {}, {}),
    ("INPAINT_MAX_INPUT_SIDE", "150", "a side over the limit of 150 pixels", {}, {}),
    ("INPAINT_MAX_INPUT_ASPECT", "1.5", "longer than 1.5:1", {}, {}),
    ("INPAINT_MAX_JPEG_SCANS", "3", "over the limit of 3 (INPAINT_MAX_JPEG_SCANS)", {"fmt": "JPEG", "progressive": True}, {}),
    ("INPAINT_MAX_WORKING_PIXELS", "100000", "over this deployment's limit of 100,000", {}, {"width": 512, "height": 512}),
    ("INPAINT_MAX_BATCH_PIXELS", "300000", "over this deployment's limit of 300,000", {}, {"num_outputs": 2}),
])
def test_each_limit_setting_reaches_the_service(inpainter, tmp_path, variable, value, refusal, files, inputs):
    photo, mask = _files(tmp_path, **files)
    _predict(inpainter, {}, tmp_path, photo, mask, **inputs)  # the default allows it
    with pytest.raises(ValueError, match=refusal.replace("(", r"\(").replace(")", r"\)")):
        _predict(inpainter, {variable: value}, tmp_path, photo, mask, **inputs)


def test_the_working_limits_allow_exactly_their_value_and_name_it_when_refused(inpainter, tmp_path):
    photo, mask = _files(tmp_path)
    size = {"width": 256, "height": 128}  # 32,768 pixels
    _predict(inpainter, {"INPAINT_MAX_WORKING_PIXELS": "32768"}, tmp_path, photo, mask, **size)
    with pytest.raises(ValueError) as refused:
        _predict(inpainter, {"INPAINT_MAX_WORKING_PIXELS": "32767"}, tmp_path, photo, mask, **size)
    assert str(refused.value) == ("width x height = 256x128 = 32,768 pixels is over this deployment's limit of 32,767; "
                                  "lower width and height")
    batch = {"num_outputs": 3, **size}  # 3 x 1 region x 32,768
    _predict(inpainter, {"INPAINT_MAX_BATCH_PIXELS": "98304"}, tmp_path, photo, mask, **batch)
    with pytest.raises(ValueError) as refused:
        _predict(inpainter, {"INPAINT_MAX_BATCH_PIXELS": "98303"}, tmp_path, photo, mask, **batch)
    assert str(refused.value) == ("num_outputs x regions x working size = 3 x 1 x 256x128 = 98,304 pixels is over this "
                                  "deployment's limit of 98,303; lower num_outputs, or width and height")


def test_the_pixel_limit_setting_sets_pillows_own_guard(inpainter, tiny_weights, tiny_settings):
    before = Image.MAX_IMAGE_PIXELS
    try:
        Inpainter.load(str(tiny_weights), Settings.from_env({
            "INPAINT_MAX_INPUT_PIXELS": "123456", "INPAINT_WEIGHTS_MANIFEST_SHA256": tiny_settings.weights_manifest_sha256,
        }))
        assert Image.MAX_IMAGE_PIXELS == 123456
    finally:
        Image.MAX_IMAGE_PIXELS = before


def test_the_device_setting_picks_the_device():
    from inpaint import pipeline

    assert pipeline.pick_device(Settings.from_env({"INPAINT_DEVICE": "cpu"}).device)[0].type == "cpu"


def test_the_weights_folder_setting_is_where_weights_are_looked_for(tiny_weights, tiny_settings, tmp_path, monkeypatch):
    from inpaint.weights import WeightsError, resolve_weights

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    settings = Settings.from_env({"INPAINT_WEIGHTS_DIR": str(tiny_weights),
                                  "INPAINT_WEIGHTS_MANIFEST_SHA256": tiny_settings.weights_manifest_sha256})
    assert resolve_weights(None, settings) == tiny_weights
    wrong = Settings.from_env({"INPAINT_WEIGHTS_DIR": str(tiny_weights), "INPAINT_WEIGHTS_MANIFEST_SHA256": "0" * 64})
    with pytest.raises(WeightsError, match="INPAINT_WEIGHTS_MANIFEST_SHA256 pins 0000"):
        resolve_weights(None, wrong)


def test_archive_settings_are_read_from_the_environment():
    settings = Settings.from_env({"INPAINT_WEIGHTS_ARCHIVE_MAX_BYTES": "5", "INPAINT_WEIGHTS_ARCHIVE_MAX_MEMBERS": "6",
                                  "INPAINT_WEIGHTS_ARCHIVE_TIMEOUT": "7.5", "INPAINT_COMPILE_CACHE_KEY": "s3cret"})
    assert (settings.weights_archive_max_bytes, settings.weights_archive_max_members, settings.weights_archive_timeout) == (5, 6, 7.5)
    assert settings.compile_cache_key == "s3cret" and "s3cret" not in repr(settings)  # a secret stays out of logs


@pytest.mark.parametrize("name, least", [
    ("WEIGHTS_ARCHIVE_MAX_BYTES", "0"), ("WEIGHTS_ARCHIVE_MAX_MEMBERS", "1"), ("WEIGHTS_ARCHIVE_TIMEOUT", "0"),
    ("MAX_INPUT_PIXELS", "1"), ("MAX_UPLOAD_BYTES", "1"), ("MAX_INPUT_SIDE", "1"), ("MAX_INPUT_ASPECT", "1"),
    ("MAX_JPEG_SCANS", "1"), ("MAX_WORKING_PIXELS", "1"), ("MAX_BATCH_PIXELS", "1"),
])
def test_a_number_setting_below_its_least_or_not_finite_is_refused_naming_it(name, least):
    """A NaN limit would switch its check off without a word (every comparison with NaN is false), and a
    limit below its least would refuse every request with a message about the request, not the setting."""
    variable = f"INPAINT_{name}"
    assert getattr(Settings.from_env({variable: least}), name.lower()) == float(least)
    floats = isinstance(getattr(Settings, name.lower()), float)
    below = str(float(least) - 0.5) if floats else str(int(least) - 1)
    for value in ([below, "nan", "inf", "-inf"] if floats else [below]):
        with pytest.raises(ValueError) as refused:
            Settings.from_env({variable: value})
        shown = repr(float(value)) if floats else value
        assert str(refused.value) == f"{variable}={shown} must be a finite number of at least {least}"


@pytest.mark.parametrize("variable", ["INPAINT_WEIGHTS_MANIFEST_SHA256", "INPAINT_COMPILED_MANIFEST_SHA256"])
def test_a_pin_must_be_a_sha256_as_sha256sum_prints_it(variable):
    digest = "0123456789abcdef" * 4
    for written in (digest, digest.upper(), f" {digest}\n"):  # as pasted from sha256sum, or from another tool
        assert getattr(Settings.from_env({variable: written}), variable.removeprefix("INPAINT_").lower()) == written
    for wrong in (digest[:-1], digest + "0", "g" + digest[1:], f"{digest}  weights-sha256.json"):
        with pytest.raises(ValueError) as refused:
            Settings.from_env({variable: wrong})
        assert str(refused.value) == (f"{variable}={wrong!r} must be a sha256: 64 hex digits, as sha256sum prints them "
                                      "(or empty)")


def test_the_device_setting_names_a_device_the_model_can_be_loaded_on():
    """cpu or cuda: diffusers' pipelines take no other device_map than "balanced", "cpu" and "cuda" (the
    current GPU), so "cuda:1" would load the model on GPU 0; the message says how to choose a GPU instead."""
    from diffusers.pipelines.pipeline_utils import SUPPORTED_DEVICE_MAP

    assert "cuda:1" not in SUPPORTED_DEVICE_MAP and "cpu" in SUPPORTED_DEVICE_MAP
    assert [Settings.from_env({"INPAINT_DEVICE": device}).device for device in ("cpu", "cuda")] == ["cpu", "cuda"]
    for wrong in ("gpu", "CUDA", "cuda:", "cuda:0", "cuda:1", "mps", "cpu "):
        with pytest.raises(ValueError) as refused:
            Settings.from_env({"INPAINT_DEVICE": wrong})
        assert str(refused.value) == (f"INPAINT_DEVICE={wrong!r} must be cpu or cuda (empty: CUDA when present); to run "
                                      "on one GPU of several, make it the only one the container sees: "
                                      "CUDA_VISIBLE_DEVICES=N, or docker run --gpus device=N")


def test_parts_compile_in_the_background_unless_the_deployment_says_otherwise():
    assert Settings().compile == Settings.from_env({}).compile == "background"


@pytest.mark.parametrize("written, mode", [("background", "background"), (" Setup ", "setup"), ("OFF", "off"),
                                           ("1", "setup"), ("true", "setup"), ("yes", "setup"), ("on", "setup"),
                                           ("0", "off"), ("false", "off"), ("No", "off")])
def test_each_way_of_writing_the_compile_mode_is_one_mode(written, mode):
    assert Settings.from_env({"INPAINT_COMPILE": written}).compile == mode == Settings(compile=written).compile


def test_a_compile_mode_it_does_not_know_is_refused_naming_the_modes():
    with pytest.raises(ValueError) as refused:
        Settings.from_env({"INPAINT_COMPILE": "always"})
    assert str(refused.value) == "INPAINT_COMPILE='always' must be one of background, setup, off"


@pytest.mark.parametrize("written, value", [("1", True), ("true", True), (" YES ", True), ("on", True), ("0", False),
                                            ("false", False), ("No", False), ("off", False)])
def test_each_way_of_writing_a_switch_sets_it(written, value):
    settings = Settings.from_env({"INPAINT_SAFETY_CHECKER": written, "INPAINT_FAST_PATH": written, "INPAINT_CUDA_GRAPHS": written})
    assert (settings.safety_checker, settings.fast_path, settings.cuda_graphs) == (value,) * 3


@pytest.mark.parametrize("variable, written, kind", [("INPAINT_SAFETY_CHECKER", "maybe", "bool"),
                                                     ("INPAINT_MAX_INPUT_SIDE", "8k", "int"),
                                                     ("INPAINT_MAX_INPUT_ASPECT", "16:1", "float")])
def test_a_value_of_the_wrong_kind_is_refused_naming_the_variable_and_the_kind(variable, written, kind):
    with pytest.raises(ValueError) as refused:
        Settings.from_env({variable: written})
    assert str(refused.value) == f"{variable}={written!r} is not a valid {kind}"


def test_an_empty_variable_keeps_the_default_and_the_process_environment_is_read_when_none_is_given(monkeypatch):
    assert Settings.from_env({"INPAINT_MAX_INPUT_SIDE": "", "INPAINT_DEVICE": ""}) == Settings()
    monkeypatch.setenv("INPAINT_MAX_INPUT_SIDE", "1234")
    assert Settings.from_env().max_input_side == 1234 and Settings.from_env({}).max_input_side == 8192
