import json
from pathlib import Path

import diffusers
import pytest

from inpaint.schedulers import SCHEDULER_NAMES, make_scheduler

CONFIG = json.loads((Path(__file__).parent.parent / "inpaint/reference/scheduler/scheduler_config.json").read_text())
EXPECTED = {
    "DDIM": diffusers.DDIMScheduler,
    "K_EULER": diffusers.EulerDiscreteScheduler,
    "DPMSolverMultistep": diffusers.DPMSolverMultistepScheduler,
    "K_EULER_ANCESTRAL": diffusers.EulerAncestralDiscreteScheduler,
    "PNDM": diffusers.PNDMScheduler,
    "KLMS": diffusers.LMSDiscreteScheduler,
}


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_each_name_makes_its_scheduler_from_sd2s_config(name):
    scheduler = make_scheduler(name, CONFIG)
    assert type(scheduler) is EXPECTED[name]
    assert scheduler.config.beta_schedule == "scaled_linear"
    scheduler.set_timesteps(4)  # KLMS needs scipy here: a dummy class would raise
    assert len(scheduler.timesteps) >= 4


def test_each_call_gives_a_fresh_instance():
    assert make_scheduler("DDIM", CONFIG) is not make_scheduler("DDIM", CONFIG)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="scheduler must be one of"):
        make_scheduler("nope", CONFIG)
