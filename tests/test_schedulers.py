import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from published import REPLICATE_SCHEDULERS

from inpaint import pipeline, schedulers
from inpaint.schedulers import SCHEDULER_NAMES, make_scheduler

CONFIG = json.loads((Path(__file__).parent.parent / "inpaint/reference/scheduler/scheduler_config.json").read_text())
EXPECTED = REPLICATE_SCHEDULERS


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_each_name_makes_its_scheduler_from_sd2s_config(name):
    scheduler = make_scheduler(name, CONFIG)
    assert isinstance(scheduler, EXPECTED[name]) and type(scheduler).__name__ == EXPECTED[name].__name__
    assert scheduler.config.beta_schedule == "scaled_linear"
    scheduler.set_timesteps(4)  # KLMS needs scipy here: a dummy class would raise
    assert len(scheduler.timesteps) >= 4


def test_each_call_gives_a_fresh_instance():
    assert make_scheduler("DDIM", CONFIG) is not make_scheduler("DDIM", CONFIG)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError) as refused:
        make_scheduler("nope", CONFIG)
    assert str(refused.value) == "scheduler must be one of DDIM, K_EULER, DPMSolverMultistep, K_EULER_ANCESTRAL, PNDM, KLMS, got 'nope'"


def test_a_timestep_view_is_read_from_the_host_copy_and_anything_else_passes_through():
    scheduler = make_scheduler("DDIM", CONFIG)
    scheduler.set_timesteps(10)
    tail = scheduler.timesteps[3:]  # what the pipeline iterates when strength < 1
    assert [scheduler._on_host(t) for t in tail] == scheduler.timesteps[3:].tolist()
    assert all(type(scheduler._on_host(t)) is int for t in tail)
    stranger = torch.tensor(999)
    assert scheduler._on_host(stranger) is stranger and scheduler._on_host(5) == 5


# ---------------------------------------------------------------- the denoising loop on the tiny model

# Operators that read a tensor's value on the host: on a GPU tensor each one waits for the GPU.
_HOST_READS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero", "aten.equal",
               "aten.masked_select", "aten._unique2", "aten.unique_dim"}


class _HostReadsPerStep(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.reads: dict[int, list[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket._qualified_op_name.replace("::", ".") in _HOST_READS:
            self.reads.setdefault(self.step, []).append(str(func))
        return func(*args, **(kwargs or {}))


def _run(pipe, name: str, monkeypatch, reads: _HostReadsPerStep | None = None) -> np.ndarray:
    original = diffusers.StableDiffusionInpaintPipeline.__call__

    def counting(self, *args, **kwargs):
        if reads is not None:
            def next_step(_pipe, index, _t, tensors):
                reads.step = index + 1
                return tensors
            kwargs["callback_on_step_end"] = next_step
        return original(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.StableDiffusionInpaintPipeline, "__call__", counting)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    job = pipeline.Generation("a red chair", None, 1, 6, 7.5, 0.9, name, 7)
    if reads is None:
        (outputs,) = pipeline.generate(pipe, [image], [mask], job)
    else:
        with reads:
            (outputs,) = pipeline.generate(pipe, [image], [mask], job)
    return np.asarray(outputs[0])


@pytest.mark.parametrize("name", ["DPMSolverMultistep", "K_EULER_ANCESTRAL", "DDIM", "PNDM"])
def test_denoising_steps_never_read_a_tensor_back_to_the_host(inpainter, monkeypatch, name):
    # On the GPU such a read is a synchronisation that stalls the queue of kernels once per step.
    # K_EULER and KLMS are left out: their per-step reads are of sigmas that diffusers keeps on the CPU.
    reads = _HostReadsPerStep()
    _run(inpainter.pipe, name, monkeypatch, reads)
    assert reads.step >= 5
    per_step = {step: ops for step, ops in reads.reads.items() if step >= 1}
    assert per_step == {}, f"{name}: host reads inside the denoising loop: {per_step}"


@pytest.mark.parametrize("name", schedulers._INDEXED_BY_TIMESTEP)
def test_host_timesteps_change_nothing_in_the_image(inpainter, monkeypatch, name):
    ours = _run(inpainter.pipe, name, monkeypatch)
    monkeypatch.setattr(schedulers, "_INDEXED_BY_TIMESTEP", ())
    plain = _run(inpainter.pipe, name, monkeypatch)
    assert np.array_equal(ours, plain)
