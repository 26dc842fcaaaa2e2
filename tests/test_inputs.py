import pytest

from inpaint.inputs import SCHEDULER_NAMES, InpaintRequest, check_inputs


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


def test_every_input_reaches_the_request_as_given():
    values = dict(
        prompt="a red chair", negative_prompt="blurry", width=128, height=192, num_outputs=3, num_inference_steps=20,
        guidance_scale=5.5, scheduler="DDIM", seed=7, invert_mask=True, mask_grow=-3, mask_blur=5, mask_padding=40,
        strength=0.5, output_format="webp", output_quality=55, disable_safety_checker=True, outpaint_left=1,
        outpaint_right=2, outpaint_up=3, outpaint_down=4,
    )
    assert check_inputs(**values) == InpaintRequest(**values)
    assert check_inputs(**values).margins == (1, 3, 2, 4)


def test_the_defaults_are_the_readmes():
    """Every default, spelled out as the README's inputs table gives it (not from the constants the code uses)."""
    assert check_inputs(seed=1) == InpaintRequest(
        prompt="a vision of paradise. unreal engine", negative_prompt=None, width=None, height=None, num_outputs=1,
        num_inference_steps=50, guidance_scale=7.5, scheduler="DPMSolverMultistep", seed=1, invert_mask=False,
        mask_grow=0, mask_blur=8, mask_padding=32, strength=1.0, output_format="png", output_quality=90,
        disable_safety_checker=False, outpaint_left=0, outpaint_right=0, outpaint_up=0, outpaint_down=0,
    )
    assert check_inputs(seed=1, prompt=None).prompt == "" and check_inputs(seed=1, negative_prompt="").negative_prompt is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 100}, "width must be a multiple of 64 from 64 to 1024, got 100"),
        ({"height": 64.5}, "height must be a whole number, got 64.5"),
        ({"num_outputs": 5}, "num_outputs must be between 1 and 4, got 5"),
        ({"num_inference_steps": 0}, "num_inference_steps must be between 1 and 500, got 0"),
        ({"guidance_scale": 21}, "guidance_scale must be between 1.0 and 20.0, got 21.0"),
        ({"guidance_scale": "7"}, "guidance_scale must be a number, got '7'"),
        ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number, got inf"),
        ({"strength": True}, "strength must be a number, got True"),
        ({"strength": 0.01, "num_inference_steps": 50},
         "strength x num_inference_steps must be at least 1 (the steps actually run), got 0.01 x 50; raise strength or "
         "num_inference_steps"),
        ({"invert_mask": 1}, "invert_mask must be true or false, got 1"),
        ({"disable_safety_checker": "no"}, "disable_safety_checker must be true or false, got 'no'"),
        ({"mask_grow": 65}, "mask_grow must be between -64 and 64, got 65"),
        ({"mask_blur": 65}, "mask_blur must be between 0 and 64, got 65"),
        ({"mask_padding": -1}, "mask_padding must be between 0 and 512, got -1"),
        ({"output_format": "gif"}, "output_format must be one of png, webp, jpg, got 'gif'"),
        ({"output_quality": 101}, "output_quality must be between 1 and 100, got 101"),
        ({"outpaint_up": 2049}, "outpaint_up must be between 0 and 2048, got 2049"),
        ({"scheduler": "Euler"}, "scheduler must be one of DDIM, K_EULER, DPMSolverMultistep, K_EULER_ANCESTRAL, PNDM, KLMS, got 'Euler'"),
        ({"seed": 2**64}, f"seed must be between {-(2**63)} and {2**64 - 1}, got {2**64}"),
        ({"seed": "1"}, "seed must be a whole number, got '1'"),
        ({"prompt": 5}, "prompt must be text, got int"),
        ({"negative_prompt": ["x"]}, "negative_prompt must be text, got list"),
        ({"prompt": "x" * 2001}, "prompt is 2,001 characters, over the limit of 2,000; shorten it (the model reads only "
                                 "the first 77 tokens, about 300 characters)"),
    ],
)
def test_each_error_says_exactly_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError) as error:
        check_inputs(**kwargs)
    assert str(error.value) == message


@pytest.mark.parametrize("name, low, high", [("mask_grow", -64, 64), ("mask_blur", 0, 64), ("mask_padding", 0, 512),
                                             ("num_outputs", 1, 4), ("num_inference_steps", 1, 500),
                                             ("output_quality", 1, 100), ("outpaint_left", 0, 2048)])
def test_the_bounds_themselves_are_accepted(name, low, high):
    for value in (low, high):
        assert getattr(check_inputs(seed=0, **{name: value}), name) == value
    assert check_inputs(seed=0, strength=0.0).strength == 0.0 and check_inputs(seed=0, strength=1.0).strength == 1.0
    assert check_inputs(seed=0, guidance_scale=1).guidance_scale == 1.0 and check_inputs(seed=0, guidance_scale=20).guidance_scale == 20.0
    assert check_inputs(seed=-(2**63)).seed == -(2**63)
    assert check_inputs(seed=0, strength=0.02, num_inference_steps=50).strength == 0.02  # exactly one step
