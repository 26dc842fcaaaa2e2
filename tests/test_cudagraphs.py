"""The UNet replayed as CUDA graphs (inpaint/fastpath/graphs.py): a pass-through on the CPU; on a GPU,
the same numbers as eager."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from inpaint import pipeline
from inpaint.fastpath import FastPath, Graphs, GraphKey, ShapeKey, UNetPart, plain_kwargs
from inpaint.fastpath.graphs import KEPT_MEMORY_FRACTION, _Failed, _Graph, make_room, pool_bytes

from conftest import run_pipeline, tiny_unet, unet_inputs


def _graphed(unet, **limits) -> UNetPart:
    """The UNet's calls through CUDA graphs alone (no compiled parts)."""
    part = UNetPart(unet, "unet", graphs=Graphs(**limits))
    unet.forward = part
    return part


def _key(height: int, width: int, batch: int = 2, compiled: bool = False) -> GraphKey:
    return GraphKey(ShapeKey((((batch, 9, height, width), (), "torch.float16", "cuda:0"),), True), compiled)


def test_on_the_cpu_every_call_runs_eagerly(tiny_weights):
    unet = tiny_unet(tiny_weights, "cpu")
    with torch.inference_mode():
        sample, timestep, states = unet_inputs(unet, "cpu")
        expected = unet(sample, timestep, encoder_hidden_states=states).sample
        graphed = _graphed(unet)
        assert isinstance(unet, UNet2DConditionModel) and unet.config.in_channels == 9  # the module stays itself
        got = unet(sample, timestep, encoder_hidden_states=states, return_dict=False)[0]
        assert torch.equal(got, unet(sample, timestep, encoder_hidden_states=states).sample)
    assert torch.equal(expected, got)
    assert not graphed.graphs.graphs


def test_the_least_recently_used_graphs_make_room_for_a_new_one():
    """The budget is in bytes, as each graph's pool measured them, not in latent positions."""
    mib = 2**20
    a, b, c = _key(64, 64), _key(96, 96), _key(64, 80)
    kept = OrderedDict([(a, _Graph(None, (), None, 300 * mib)), (b, _Failed(3)), (c, _Graph(None, (), None, 200 * mib))])
    graphs = Graphs(max_kept_bytes=1000 * mib)
    assert graphs.max_kept_bytes == 1000 * mib  # the budget given (None: a fraction of the GPU's, at the first graph)
    graphs.graphs = kept
    assert graphs.kept_bytes() == 500 * mib  # b runs eagerly and holds nothing
    make_room(kept, 500 * mib, limit=1000 * mib)  # exactly fits
    assert list(kept) == [a, b, c]
    make_room(kept, 501 * mib, limit=1000 * mib)  # a goes (b holds no graph, so the room is made by a alone)
    assert list(kept) == [b, c]
    make_room(kept, 1000 * mib, limit=1000 * mib)
    assert not kept


def test_a_shape_whose_recording_failed_runs_eagerly_and_is_recorded_again_later():
    graphs = Graphs(retry_after_calls=3)
    key = _key(8, 8)
    graphs.graphs[key] = _Failed(graphs.retry_after_calls)
    calls = []

    def call(value):
        calls.append(value)
        return value + 1

    for step in range(3):
        output, recorded = graphs.run(key, call, (torch.tensor(step),))
        assert output == step + 1 and recorded  # run eagerly: this call's own result
    assert calls == [0, 1, 2]
    assert key not in graphs.graphs  # the next call records it again


def test_only_empty_extra_inputs_are_replayable():
    assert plain_kwargs({"timestep_cond": None, "cross_attention_kwargs": None, "added_cond_kwargs": {}})
    assert not plain_kwargs({"cross_attention_kwargs": {"scale": 0.5}})
    assert not plain_kwargs({"timestep_cond": torch.zeros(1)})


def test_cpu_calls_and_calls_beyond_the_limits_get_no_graph():
    graphs = Graphs(max_positions=2 * 64 * 64)
    with torch.inference_mode():
        assert not graphs.replayable(ShapeKey.of(torch.zeros(2, 9, 8, 8)))  # the CPU
        assert not graphs.replayable(_key(64, 65).shape)  # a CUDA call over max_positions
    assert not graphs.replayable(_key(8, 8).shape)  # autograd on


@pytest.mark.gpu
def test_cuda_calls_up_to_the_limit_get_a_graph():
    """(On a machine without a GPU, torch cannot even say whether a stream is capturing.)"""
    graphs = Graphs(max_positions=2 * 64 * 64)
    with torch.inference_mode():
        assert graphs.replayable(_key(64, 64).shape)  # exactly max_positions
        assert graphs.replayable(_key(8, 8).shape)


def test_the_pipeline_with_graphs_installed_paints_the_same_on_the_cpu(tiny_weights):
    plain = pipeline.load_pipeline(tiny_weights, torch.device("cpu"), torch.float32)
    expected = run_pipeline(plain)
    _graphed(plain.unet)
    assert all(np.array_equal(a, b) for a, b in zip(expected, run_pipeline(plain)))


@pytest.mark.gpu
def test_replays_compute_what_eager_computes_for_fresh_inputs(tiny_weights):
    unet = tiny_unet(tiny_weights, "cuda", torch.float16)
    eager = unet.forward
    graphed = _graphed(unet)
    with torch.inference_mode():
        results = []
        for seed in range(4):  # the first call records, the rest replay: each on new inputs
            inputs = unet_inputs(unet, "cuda", seed=seed)
            got = unet(*inputs[:2], encoder_hidden_states=inputs[2], return_dict=False)[0]
            want = eager(*inputs[:2], encoder_hidden_states=inputs[2], return_dict=False)[0]
            torch.testing.assert_close(got, want)  # the same kernels: equal up to fp16 rounding at most
            results.append((got, want))
        assert len(graphed.graphs.graphs) == 1 and isinstance(next(iter(graphed.graphs.graphs.values())), _Graph)
        for got, want in results:  # earlier results are copies: later replays did not overwrite them
            assert torch.equal(got, want)


@pytest.mark.gpu
def test_one_graph_per_shape_and_the_oldest_is_dropped_to_keep_their_memory_under_the_budget(tiny_weights):
    unet = tiny_unet(tiny_weights, "cuda", torch.float16)
    graphed = _graphed(unet)
    graphs = graphed.graphs
    with torch.inference_mode():
        def call(size, batch=2):
            sample, timestep, states = unet_inputs(unet, "cuda", batch=batch, size=size)
            unet(sample, timestep, encoder_hidden_states=states)

        call(8)
        call(16)
        # each graph's size is its pool's, as the allocator reports it
        sizes = {key.shape.shape[-1]: entry.bytes for key, entry in graphs.graphs.items()}
        assert all(size > 0 for size in sizes.values())
        assert sizes == {key.shape.shape[-1]: pool_bytes(entry.graph) for key, entry in graphs.graphs.items()}
        # the default budget is a fraction of the GPU's memory
        assert graphs.max_kept_bytes == int(torch.cuda.get_device_properties(0).total_memory * KEPT_MEMORY_FRACTION)
        graphs.max_kept_bytes = sizes[8] + sizes[16]  # exactly these two
        call(8)
        call(12)  # does not fit beside both: 16, used least recently, goes first
        shapes = [key.shape.shape[-1] for key in graphs.graphs]
        assert shapes[-1] == 12 and 16 not in shapes and graphs.kept_bytes() <= graphs.max_kept_bytes
        call(72, batch=8)  # over max_positions (8 x 72 x 72 latents): eager, nothing recorded
        assert [key.shape.shape[-1] for key in graphs.graphs] == shapes
        graphs.max_kept_bytes = 1  # no graph fits: the next shape runs eagerly, and is tried again later
        call(20)
        assert isinstance(graphs.graphs[next(key for key in graphs.graphs if key.shape.shape[-1] == 20)], _Failed)
    graphs.clear()
    assert not graphs.graphs


@pytest.mark.gpu
def test_a_prediction_with_graphs_paints_what_eager_paints(tiny_weights):
    device = torch.device("cuda")
    eager = pipeline.load_pipeline(tiny_weights, device, torch.float16, FastPath(cuda_graphs=False))
    graphed = pipeline.load_pipeline(tiny_weights, device, torch.float16, FastPath())
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(run_pipeline(eager), run_pipeline(graphed)))
