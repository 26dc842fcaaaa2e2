"""Checks that need the real checkpoint (script/download-weights) or a GPU; they skip cleanly without."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inpaint import inputs
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
    outputs = predictor.run(
        image=ROOT / "examples" / "chelsea.png",
        mask=ROOT / "examples" / "chelsea-mask.png",
        prompt="a cat wearing round sunglasses, photo",
        negative_prompt=None,
        width=512,
        height=512,
        num_outputs=1,
        num_inference_steps=25,
        guidance_scale=inputs.DEFAULT_GUIDANCE,
        scheduler=inputs.DEFAULT_SCHEDULER,
        seed=42,
    )
    result = np.asarray(Image.open(outputs[0]), dtype=np.float32)
    assert result.shape == (300, 451, 3)
    assert 20 < result.std() < 120  # a picture, not black or noise-free grey
