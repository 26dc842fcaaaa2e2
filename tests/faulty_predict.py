"""predict.py's Predictor with one GPU fault injected, for the health tests through Cog's real server.

A prediction whose prompt is FAULT_PROMPT fails in the model as a sticky CUDA error fails: torch raises
a RuntimeError (torch.AcceleratorError) with the CUDA runtime's own message. Everything else is the
real Predictor. Run with COG_PREDICT_TYPE_STUB=tests/faulty_predict.py:Predictor.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inpaint import pipeline  # noqa: E402
from predict import Predictor as RealPredictor  # noqa: E402

FAULT_PROMPT = "inject a CUDA fault"
# What torch 2.11 says for cudaErrorIllegalAddress (c10/cuda/CUDAException.cpp).
CUDA_FAULT = (
    "CUDA error: an illegal memory access was encountered\n"
    "Search for `cudaErrorIllegalAddress' in https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES.html "
    "for more information.\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
)


class Predictor(RealPredictor):
    def setup(self, weights=None) -> None:
        super().setup(weights)
        generate = pipeline.generate

        def faulty(pipe, images, masks, job, **kwargs):
            if job.prompt == FAULT_PROMPT:
                raise RuntimeError(CUDA_FAULT)
            return generate(pipe, images, masks, job, **kwargs)

        pipeline.generate = faulty
