"""Facts published outside this project that the tests check the code against."""

import diffusers

# Replicate's stability-ai/stable-diffusion-inpainting scheduler choices and the diffusers classes they name.
REPLICATE_SCHEDULERS = {
    "DDIM": diffusers.DDIMScheduler,
    "K_EULER": diffusers.EulerDiscreteScheduler,
    "DPMSolverMultistep": diffusers.DPMSolverMultistepScheduler,
    "K_EULER_ANCESTRAL": diffusers.EulerAncestralDiscreteScheduler,
    "PNDM": diffusers.PNDMScheduler,
    "KLMS": diffusers.LMSDiscreteScheduler,
}
