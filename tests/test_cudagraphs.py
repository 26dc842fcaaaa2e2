"""The UNet replayed as CUDA graphs: a pass-through on the CPU; on a GPU, the same numbers as eager."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from inpaint import cudagraphs, pipeline

from conftest import run_pipeline, tiny_unet, unet_inputs



def test_on_the_cpu_every_call_runs_eagerly(tiny_weights):
    unet = tiny_unet(tiny_weights, "cpu")
    with torch.inference_mode():
        sample, timestep, states = unet_inputs(unet, "cpu")
        expected = unet(sample, timestep, encoder_hidden_states=states).sample
        graphed = cudagraphs.use_cuda_graphs(unet)
        assert isinstance(unet, UNet2DConditionModel) and unet.config.in_channels == 9  # the module stays itself
        got = unet(sample, timestep, encoder_hidden_states=states, return_dict=False)[0]
        assert torch.equal(got, unet(sample, timestep, encoder_hidden_states=states).sample)
    assert torch.equal(expected, got)
    assert not graphed.graphs


def test_the_least_recently_used_graphs_make_room_for_a_new_one():
    graphs = OrderedDict([(((2, 9, 64, 64),), "a"), (((2, 9, 96, 96),), None), (((2, 9, 64, 80),), "c")])
    cudagraphs.make_room(graphs, 2 * 64 * 64, limit=4 * 2 * 64 * 64)  # 8192 + 10240 kept: 8192 more fit
    assert len(graphs) == 3
    cudagraphs.make_room(graphs, 2 * 128 * 128, limit=6 * 2 * 64 * 64)  # needs 32768 of 49152: "a" goes
    assert [entry for entry in graphs.values()] == [None, "c"]
    cudagraphs.make_room(graphs, 2 * 128 * 128, limit=2 * 128 * 128)
    assert not graphs


def test_only_empty_extra_inputs_are_replayable():
    assert cudagraphs.plain_kwargs({"timestep_cond": None, "cross_attention_kwargs": None, "added_cond_kwargs": {}})
    assert not cudagraphs.plain_kwargs({"cross_attention_kwargs": {"scale": 0.5}})
    assert not cudagraphs.plain_kwargs({"timestep_cond": torch.zeros(1)})


def test_the_pipeline_with_graphs_installed_paints_the_same_on_the_cpu(tiny_weights):
    plain = pipeline.load_pipeline(tiny_weights, torch.device("cpu"), torch.float32)
    expected = run_pipeline(plain)
    cudagraphs.use_cuda_graphs(plain.unet)
    assert all(np.array_equal(a, b) for a, b in zip(expected, run_pipeline(plain)))


@pytest.mark.gpu
def test_replays_compute_what_eager_computes_for_fresh_inputs(tiny_weights):
    unet = tiny_unet(tiny_weights, "cuda", torch.float16)
    eager = unet.forward
    graphed = cudagraphs.use_cuda_graphs(unet)
    with torch.inference_mode():
        results = []
        for seed in range(4):  # the first call records, the rest replay: each on new inputs
            inputs = unet_inputs(unet, "cuda", seed=seed)
            got = unet(*inputs[:2], encoder_hidden_states=inputs[2], return_dict=False)[0]
            want = eager(*inputs[:2], encoder_hidden_states=inputs[2], return_dict=False)[0]
            torch.testing.assert_close(got, want)  # the same kernels: equal up to fp16 rounding at most
            results.append((got, want))
        assert len(graphed.graphs) == 1 and next(iter(graphed.graphs.values())) is not None
        for got, want in results:  # earlier results are copies: later replays did not overwrite them
            assert torch.equal(got, want)


@pytest.mark.gpu
def test_one_graph_per_shape_and_the_oldest_is_dropped(tiny_weights):
    unet = tiny_unet(tiny_weights, "cuda", torch.float16)
    graphed = cudagraphs.use_cuda_graphs(unet, max_kept_positions=2 * 8 * 8 + 2 * 16 * 16)
    with torch.inference_mode():
        for size in (8, 16, 8, 12):  # 12 does not fit beside 8 and 16: 16, used least recently, goes
            sample, timestep, states = unet_inputs(unet, "cuda", size=size)
            unet(sample, timestep, encoder_hidden_states=states)
        assert [key[0][-1] for key in graphed.graphs] == [8, 12]
        big = unet_inputs(unet, "cuda", batch=2, size=32)
        unet(big[0], big[1], encoder_hidden_states=big[2])  # over the limit: eager, nothing recorded
        assert len(graphed.graphs) == 2
    cudagraphs.release()
    assert not graphed.graphs


@pytest.mark.gpu
def test_a_prediction_with_graphs_paints_what_eager_paints(tiny_weights):
    device = torch.device("cuda")
    eager = pipeline.load_pipeline(tiny_weights, device, torch.float16, cuda_graphs=False)
    graphed = pipeline.load_pipeline(tiny_weights, device, torch.float16)
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(run_pipeline(eager), run_pipeline(graphed)))
