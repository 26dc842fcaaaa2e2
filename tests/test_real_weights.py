"""Checks that need the real checkpoint (script/download-weights) or a GPU; they skip cleanly without."""

import asyncio
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inpaint.weights import verify_weights

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.real_weights
def test_real_weights_match_the_published_manifest():
    verify_weights(ROOT / "weights", force=True)


@pytest.mark.real_weights
@pytest.mark.gpu
def test_real_model_on_the_gpu_paints_the_example(tmp_path):
    from predict import Predictor

    predictor = Predictor()
    predictor.setup(weights=None)
    assert predictor.inpainter.pipe.unet.dtype.itemsize == 2  # fp16 on CUDA
    from conftest import PREDICT_DEFAULTS

    outputs = asyncio.run(predictor.run(
        image=ROOT / "examples" / "chelsea.png",
        mask=ROOT / "examples" / "chelsea-mask.png",
        **{**PREDICT_DEFAULTS, "prompt": "a cat wearing round sunglasses, photo", "width": None, "height": None,
           "num_inference_steps": 25, "seed": 42},
    ))
    result = np.asarray(Image.open(outputs[0]), dtype=np.float32)
    assert result.shape == (300, 451, 3)
    assert 20 < result.std() < 120  # a picture, not black or noise-free grey


@pytest.mark.gpu
def test_fast_path_matches_plain_diffusers_on_the_gpu(tiny_weights):
    import torch
    from PIL import Image as PILImage

    from inpaint import pipeline
    from inpaint.fastpath import FastPath

    device, dtype = pipeline.pick_device()
    image = PILImage.open(ROOT / "examples" / "chelsea.png").convert("RGB").resize((256, 256))
    mask = PILImage.new("L", (256, 256), 0)
    mask.paste(255, (64, 64, 192, 160))
    job = pipeline.Generation("a cat", None, 2, 10, 7.5, 1.0, "DPMSolverMultistep", 7)
    results = []
    for enabled in (False, True):
        fast = FastPath(enabled)
        pipe = pipeline.load_pipeline(tiny_weights, device, dtype, fast)
        fast.warm_up(pipe)
        results.append([np.asarray(out, dtype=np.float64)
                        for out in pipeline.generate(pipe, [image], [mask], job, fast=fast)[0]])
        del pipe
        torch.cuda.empty_cache()
    for plain, fast in zip(*results):
        mse = np.mean((plain - fast) ** 2)
        assert mse == 0 or 10 * np.log10(255**2 / mse) > 35
