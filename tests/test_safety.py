"""The safety checker: the real StableDiffusionSafetyChecker class with tiny random weights.

Its thresholds (concept_embeds_weights) decide what it flags; the tests set them to flag nothing,
everything, or exactly the images whose similarity lies above a chosen value.
"""

import contextlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
from PIL import Image

from conftest import make_mask, make_photo
from inpaint.inputs import check_inputs
from inpaint.safety import AllOutputsFlagged, SafetyChecker


@contextlib.contextmanager
def thresholds(checker, value):
    weights = checker.model.concept_embeds_weights
    saved = weights.detach().clone()
    with torch.no_grad():
        weights.copy_(torch.as_tensor(value, dtype=weights.dtype).expand_as(weights))
    try:
        yield
    finally:
        with torch.no_grad():
            weights.copy_(saved)


def top_similarity(checker, images):
    """Each image's highest cosine similarity to the concept embeddings, as the checker computes it."""
    pixels = checker.processor(images=images, return_tensors="pt").pixel_values
    with torch.inference_mode():
        pooled = checker.model.vision_model(pixels.to(checker.model.dtype))[1]
        cos = cosine_distance(checker.model.visual_projection(pooled), checker.model.concept_embeds)
    return cos.max(dim=1).values.float().numpy()


@pytest.fixture
def files(tmp_path):
    return make_photo(tmp_path / "p.png", (96, 64)), make_mask(tmp_path / "m.png", (96, 64))


def predict(inpainter, files, tmp_path, **kwargs):
    image, mask = files
    request = check_inputs(seed=3, num_inference_steps=2, width=64, height=64, **kwargs)
    return inpainter.inpaint(image, mask, request, tmp_path)


def test_none_flagged(inpainter, files, tmp_path):
    result = predict(inpainter, files, tmp_path, num_outputs=3)
    assert len(result.paths) == 3
    assert result.metrics["nsfw_flagged"] == 0 and result.metrics["nsfw_flagged_indices"] == []
    assert "safety" in result.metrics["timings"]


def test_some_flagged_are_left_out_and_named(inpainter, files, tmp_path, caplog):
    checker = inpainter.safety
    with thresholds(checker, 2.0):  # nothing flagged: look at what the model made
        crops = []
        original = checker.flags

        def spy(images):
            crops.extend(images)
            return original(images)

        checker.flags = spy
        try:
            predict(inpainter, files, tmp_path, num_outputs=4)
        finally:
            del checker.flags
    scores = top_similarity(checker, crops)
    assert len(set(np.round(scores, 4))) == 4, scores  # distinct, so a threshold can split them
    cut = float(np.sort(scores)[1] + np.sort(scores)[2]) / 2
    expected = sorted(int(index) for index in np.flatnonzero(scores > cut))
    with thresholds(checker, cut), caplog.at_level("WARNING"):
        result = predict(inpainter, files, tmp_path, num_outputs=4)
    assert result.metrics["nsfw_flagged_indices"] == expected and result.metrics["nsfw_flagged"] == 2
    assert len(result.paths) == 2
    assert f"the safety checker flagged output(s) {expected} of 4 as potentially NSFW; they are left out" in caplog.messages


def test_all_flagged_fails_with_a_clear_message(inpainter, files, tmp_path):
    with thresholds(inpainter.safety, -2.0), pytest.raises(AllOutputsFlagged) as error:
        predict(inpainter, files, tmp_path, num_outputs=2)
    assert str(error.value) == ("the safety checker flagged all 2 output(s) as potentially NSFW, so none is returned; "
                                "try another prompt or seed")


def test_disabled_per_request(inpainter, files, tmp_path):
    with thresholds(inpainter.safety, -2.0):
        result = predict(inpainter, files, tmp_path, num_outputs=2, disable_safety_checker=True)
    assert len(result.paths) == 2 and "nsfw_flagged" not in result.metrics


def test_empty_mask_is_not_checked(inpainter, tmp_path):
    image = make_photo(tmp_path / "p.png", (40, 30))
    Image.new("L", (40, 30), 0).save(tmp_path / "black.png")
    with thresholds(inpainter.safety, -2.0):
        result = inpainter.inpaint(image, tmp_path / "black.png", check_inputs(seed=1), tmp_path)
    assert len(result.paths) == 1  # nothing was generated, so nothing can be flagged


# ------------------------------------------------------------------------------------ loading the checker


def test_the_checker_loads_as_asked_and_flags(tiny_weights):
    """Built here, not in a fixture: what setup does, checked in full."""
    root, module = logging.getLogger(), logging.getLogger(StableDiffusionSafetyChecker.__module__)
    levels = root.level, module.level
    root.setLevel(logging.INFO)
    module.setLevel(logging.NOTSET)
    try:
        checker = SafetyChecker.load(tiny_weights, torch.device("cpu"), torch.float32)
        # its module's promise of black images is silenced, and nothing else's logging
        assert (module.level, root.level) == (logging.ERROR, logging.INFO)
    finally:
        root.setLevel(levels[0])
        module.setLevel(levels[1])
    assert (checker.device, checker.model.dtype) == (torch.device("cpu"), torch.float32)
    assert not checker.model.training and next(checker.model.parameters()).dtype == torch.float32
    assert checker.flags([Image.new("RGB", (64, 48), "white"), Image.new("RGB", (30, 90), "red")]) == [False, False]
    with thresholds(checker, -2.0):  # a cosine similarity is above -2 always: everything flagged
        assert checker.flags([Image.new("RGB", (64, 48), "white")]) == [True]
    half = SafetyChecker.load(tiny_weights, torch.device("cpu"), torch.float16)
    assert next(half.model.parameters()).dtype == torch.float16 and half.model.dtype == torch.float16
    assert half.flags([Image.new("RGB", (64, 48), "white")]) == [False]  # float32 pixels, cast by CLIP itself


def test_the_checker_never_unpickles_weights(tiny_weights, tmp_path):
    """A checker folder holding only a pickle (which runs code when loaded) is refused, not loaded."""
    shutil.copytree(tiny_weights, tmp_path / "w")
    folder = tmp_path / "w" / "safety_checker"
    weights = safetensors.torch.load_file(folder / "model.fp16.safetensors")
    (folder / "model.fp16.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.fp16.bin")
    with pytest.raises(OSError, match="safetensors"):
        SafetyChecker.load(tmp_path / "w", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("gone", ["safety_checker", "feature_extractor"])
def test_the_checker_never_asks_a_hub_for_a_folder_that_is_gone(tiny_weights, tmp_path, monkeypatch, gone):
    """A relative folder name such as weights/safety_checker reads like a hub repository id. If the folder
    is gone by the time the checker loads, the loaders must fail on the spot, not fetch that repository
    (here a stand-in hub that records every request, reached as HF_ENDPOINT reaches the real one)."""
    from huggingface_hub import constants

    from fakehub import FakeHub

    hub = FakeHub({})
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    shutil.copytree(tiny_weights, tmp_path / "weights")
    shutil.rmtree(tmp_path / "weights" / gone)
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(OSError):
            SafetyChecker.load(Path("weights"), torch.device("cpu"), torch.float32)
    finally:
        hub.close()
    # huggingface_hub's own agent registry (utils/_detect_agent.py) is fetched whenever it builds request
    # headers, local lookups included; what matters is that no repository was asked for
    assert [request for request in hub.requests if request != "GET /api/agent-harnesses"] == []
