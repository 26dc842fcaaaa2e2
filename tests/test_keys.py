"""The shape key (inpaint/fastpath/keys.py): what a CUDA graph or a compiled part is made for."""

import json

import pytest
import torch

from inpaint.fastpath.keys import GraphKey, ShapeKey


def _unet_call():
    sample = torch.zeros(2, 9, 8, 6).to(memory_format=torch.channels_last)  # (B, C, H/8, W/8), as the fast path keeps it
    return sample, torch.tensor(500), torch.zeros(2, 77, 32, dtype=torch.float16)


def test_a_key_holds_each_inputs_shape_strides_dtype_and_device_and_the_mode():
    sample, timestep, text = _unet_call()
    with torch.inference_mode():
        key = ShapeKey.of(sample, timestep, text)
    assert key.inputs == (((2, 9, 8, 6), (432, 1, 54, 9), "torch.float32", "cpu"), ((), (), "torch.int64", "cpu"),
                          ((2, 77, 32), (2464, 32, 1), "torch.float16", "cpu"))
    assert key.inference and not ShapeKey.of(sample, timestep, text).inference
    assert ShapeKey.of(sample.contiguous(), timestep, text) != ShapeKey.of(sample, timestep, text)  # strides count
    assert (key.shape, key.device, key.positions(), str(key)) == ((2, 9, 8, 6), "cpu", 2 * 8 * 6, "2x9x8x6")


def test_examples_have_the_keys_layout_random_floats_and_whole_numbers_of_500():
    key = ShapeKey.of(*_unet_call())
    sample, timestep, text = key.example()
    assert ShapeKey.of(sample, timestep, text) == key
    assert timestep.item() == 500 and sample.std() > 0.5 and text.std() > 0.5  # normal(0, 1), not zeros or 500


def test_a_key_goes_through_json_and_back_unchanged():
    with torch.inference_mode():
        key = ShapeKey.of(*_unet_call())
    text = key.to_json()
    assert json.loads(text) == [[[[2, 9, 8, 6], [432, 1, 54, 9], "torch.float32", "cpu"], [[], [], "torch.int64", "cpu"],
                                 [[2, 77, 32], [2464, 32, 1], "torch.float16", "cpu"]], True]
    assert ShapeKey.from_json(text) == key and hash(ShapeKey.from_json(text)) == hash(key)


GOOD = [[2, 9, 8, 6], [432, 1, 54, 9], "torch.float32", "cpu"]


@pytest.mark.parametrize("document", [
    None, 5, "", "[]", "[[], true]", json.dumps([[GOOD], 1]), json.dumps([[GOOD], True, 0]), json.dumps([[GOOD[:3]], True]),
    json.dumps([[[[8], [1], "torch.float32", "cpu"]], True]), json.dumps([[[[9, 8, 6], [48, 6, 1], "torch.float32", "cpu"]], True]),
    json.dumps([[[[2, 9, 8, 6], [1, 1, 1], "torch.float32", "cpu"]], True]),
    json.dumps([[[[2, 9, 8, -6], [432, 1, 54, 9], "torch.float32", "cpu"]], True]),
    json.dumps([[[[2, 9, 8, 6.0], [432, 1, 54, 9], "torch.float32", "cpu"]], True]),
    json.dumps([[[[2, 9, 8, True], [432, 1, 54, 9], "torch.float32", "cpu"]], True]),
    json.dumps([[[[2, 9, 8, 6], [432, 1, 54, 9], "torch.nn", "cpu"]], True]),
    json.dumps([[[[2, 9, 8, 6], [432, 1, 54, 9], "torch.float32", 0]], True]),
    "[" * 100_000 + "]" * 100_000,
], ids=["null", "a number", "empty", "no mode", "no inputs", "a mode of 1", "three items", "three fields", "one side",
        "a first input of three sides",
        "strides unlike the shape", "a negative side", "a fractional side", "a side of true", "no dtype", "no device",
        "nested past the parser's depth"])
def test_text_that_is_no_key_is_refused_with_a_value_error(document):
    """A shipped artifact's manifest names keys (fastpath/artifact.py): whatever is not a key to_json could write
    is a ValueError, not a key that fails later, nor another kind of error."""
    with pytest.raises(ValueError, match="^not a shape key: "):
        ShapeKey.from_json(document)


def test_a_key_of_an_expanded_input_goes_through_json_and_back():
    """An input `expand` made (stride 0) is a key as any other: only text that is no key is refused."""
    sample, timestep, text = _unet_call()
    key = ShapeKey.of(sample, timestep, text[:1].expand(2, 77, 32))
    assert key.inputs[2][1] == (0, 32, 1) and ShapeKey.from_json(key.to_json()) == key


def test_a_graph_from_the_compiled_part_is_keyed_apart_from_one_of_the_eager_part():
    key = ShapeKey.of(*_unet_call())
    assert GraphKey(key, True) != GraphKey(key, False) and GraphKey(key, True) == GraphKey(key, True)
