import pytest

from inpaint.inputs import SCHEDULER_NAMES, check_inputs


def test_defaults_are_replicates_and_the_working_size_is_automatic():
    request = check_inputs(seed=1)
    assert request.prompt == "a vision of paradise. unreal engine"
    assert (request.width, request.height, request.num_outputs) == (None, None, 1)
    assert check_inputs(width=512, height=512).width == 512
    assert (request.num_inference_steps, request.guidance_scale, request.scheduler) == (50, 7.5, "DPMSolverMultistep")


def test_missing_seed_is_a_random_32_bit_seed():
    seeds = {check_inputs().seed for _ in range(20)}
    assert len(seeds) > 1
    assert all(0 <= seed < 2**32 for seed in seeds)


@pytest.mark.parametrize(
    "name, value",
    [("seed", 3.0), ("num_outputs", 2.0), ("width", 256.0), ("num_inference_steps", 7.0)],
)
def test_whole_number_floats_become_ints(name, value):
    assert getattr(check_inputs(**{"seed": 1, name: value}), name) == int(value)
    assert type(getattr(check_inputs(**{"seed": 1, name: value}), name)) is int


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"width": 100}, ["width", "multiple of 64", "100"]),
        ({"height": 2048}, ["height", "2048"]),
        ({"num_outputs": 5}, ["num_outputs", "between 1 and 4", "5"]),
        ({"num_outputs": 0}, ["num_outputs", "0"]),
        ({"num_inference_steps": 501}, ["num_inference_steps", "500"]),
        ({"guidance_scale": 0.5}, ["guidance_scale", "between 1.0 and 20.0"]),
        ({"guidance_scale": float("nan")}, ["guidance_scale", "finite"]),
        ({"scheduler": "Euler"}, ["scheduler", "DDIM", "'Euler'"]),
        ({"seed": 3.5}, ["seed", "whole number", "3.5"]),
        ({"seed": 2.0**70}, ["seed", "between"]),
        ({"seed": 2**64}, ["seed", "between"]),
        ({"seed": True}, ["seed", "whole number"]),
        ({"prompt": 5}, ["prompt", "text"]),
        ({"mask_grow": 65}, ["mask_grow", "between -64 and 64", "65"]),
        ({"mask_grow": -65}, ["mask_grow", "-65"]),
        ({"mask_blur": -1}, ["mask_blur", "between 0 and 64"]),
        ({"mask_blur": 2.5}, ["mask_blur", "whole number"]),
        ({"mask_padding": 513}, ["mask_padding", "between 0 and 512"]),
        ({"strength": 1.5}, ["strength", "between 0.0 and 1.0"]),
        ({"strength": -0.1}, ["strength", "-0.1"]),
        ({"strength": 0.01, "num_inference_steps": 50}, ["strength x num_inference_steps", "at least 1"]),
        ({"invert_mask": "yes"}, ["invert_mask", "true or false"]),
        ({"output_format": "gif"}, ["output_format", "png, webp, jpg", "'gif'"]),
        ({"output_quality": 0}, ["output_quality", "between 1 and 100"]),
        ({"output_quality": 101}, ["output_quality", "101"]),
    ],
)
def test_bad_values_name_the_input_and_the_accepted_range(kwargs, words):
    with pytest.raises(ValueError) as error:
        check_inputs(**kwargs)
    for word in words:
        assert word in str(error.value)


def test_negative_and_large_seeds_within_torchs_range_are_accepted():
    assert check_inputs(seed=-5).seed == -5
    assert check_inputs(seed=2**64 - 1).seed == 2**64 - 1


def test_every_scheduler_name_is_accepted():
    for name in SCHEDULER_NAMES:
        assert check_inputs(scheduler=name, seed=0).scheduler == name
