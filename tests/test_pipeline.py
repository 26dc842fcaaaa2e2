"""The model wrapper on the tiny weights: the fast path's changes, and what the fast path does on the CPU."""

import logging
import threading
import time

import numpy as np
import pytest
import torch

from inpaint import pipeline
from inpaint.config import Settings
from inpaint.fastpath import FastPart, FastPath, UNetPart

from conftest import run_pipeline, pipeline_inputs


@pytest.fixture
def tiny_pipe(tiny_weights):
    return pipeline.load_pipeline(tiny_weights, torch.device("cpu"), torch.float32)


def test_the_deployments_fast_path_does_nothing_on_the_cpu(tiny_weights):
    fast = FastPath.for_device(torch.device("cpu"), Settings(compile="setup"))
    pipe = pipeline.load_pipeline(tiny_weights, torch.device("cpu"), torch.float32, fast)
    plain = pipeline.load_pipeline(tiny_weights, torch.device("cpu"), torch.float32)
    before, after = plain.unet.state_dict(), pipe.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    assert "forward" not in vars(pipe.unet)  # neither compiled nor routed through CUDA graphs
    assert not pipe.vae.use_slicing and not fast.parts and fast.compiler is None
    fast.warm_up(pipe)  # nothing: no inpainting, no compile asked for
    with fast.prediction():
        pass
    fast.release()
    assert FastPath.for_device(torch.device("cuda"), Settings()).enabled
    assert not FastPath.for_device(torch.device("cuda"), Settings(fast_path=False)).enabled


def test_the_fast_path_changes_the_images_only_by_rounding(tiny_pipe):
    # channels_last, the sliced VAE and the CUDA graphs' wrapper run here as they do on a GPU, so a
    # change in diffusers that breaks one of them fails on the CPU, not first on a lent GPU.
    plain = run_pipeline(tiny_pipe)
    fast = FastPath().install(tiny_pipe)
    assert tiny_pipe.vae.use_slicing
    assert tiny_pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(tiny_pipe.unet.forward, UNetPart) and list(fast.parts) == ["unet"]  # graphs; nothing compiled
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(plain, run_pipeline(tiny_pipe, fast)))


def test_every_part_is_routed_through_one_stand_in_when_compiling(tiny_pipe, tmp_path):
    fast = FastPath(compile="background", cache_dir=tmp_path).install(tiny_pipe)
    modules = {"unet": tiny_pipe.unet, "vae.decoder": tiny_pipe.vae.decoder, "vae.encoder": tiny_pipe.vae.encoder}
    assert list(fast.parts) == list(modules) == [part.part for part in fast.compiled_parts]
    for name, module in modules.items():
        part = fast.parts[name]
        assert isinstance(part, FastPart) and module.forward is part and part.module is module and part.part == name
        assert part.compiled.compiler is fast.compiler  # one worker for all the parts
        assert (part.graphs is not None) == (name == "unet")
    fast.stop()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_every_stage_is_timed_and_the_rest_is_denoising(tiny_weights, device):
    """On the CPU wall time; on CUDA events read once the prediction is over (no sync between stages)."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = pipeline.load_pipeline(tiny_weights, torch.device(device), dtype)
    image, mask = pipeline_inputs()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    pipeline.generate(pipe, [image], [mask], pipeline.Generation("a chair", None, 1, 3, 7.5, 1.0, "DDIM", 1), timings=timings)
    wall = time.perf_counter() - start
    assert set(timings) == {"text_encode", "vae_encode", "vae_decode", "denoise"}
    assert all(seconds > 0 for seconds in timings.values())
    assert sum(timings.values()) <= wall  # they split the pipeline call, which is part of generate


def _job(steps: int = 3, prompt: str = "a chair") -> pipeline.Generation:
    return pipeline.Generation(prompt, None, 1, steps, 7.5, 1.0, "DDIM", 1)


class _Stop(Exception):
    pass


def test_stop_is_called_after_each_step_and_ends_the_run_where_it_raises(tiny_pipe):
    """How a cancellation reaches the denoising loop: `stop` after every step; what it raises ends generate."""
    image, mask = pipeline_inputs()
    calls = []
    pipeline.generate(tiny_pipe, [image], [mask], _job(4), stop=lambda: calls.append("step"))
    assert len(calls) == 4

    def second_step_stops():
        calls.append("step")
        if len(calls) == 2:
            raise _Stop

    calls.clear()
    with pytest.raises(_Stop):
        pipeline.generate(tiny_pipe, [image], [mask], _job(4), stop=second_step_stops)
    assert len(calls) == 2


def _diffusers_log(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name.startswith("diffusers")]


def test_the_model_has_no_checker_of_its_own_and_a_prediction_logs_only_its_progress(tiny_pipe, caplog, capfd):
    """The service checks each output itself (inpaint/safety.py): the pipeline loads no second checker, and a
    prediction does not warn that it has none (diffusers' "You have disabled the safety checker"). Its
    progress bar is one ASCII line, named."""
    assert tiny_pipe.components["safety_checker"] is None
    image, mask = pipeline_inputs()
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        pipeline.generate(tiny_pipe, [image], [mask], _job())
    assert _diffusers_log(caplog) == []
    progress = capfd.readouterr().err
    assert progress.startswith("\rdenoising: ") and progress.count("\n") == 1 and "3/3" in progress and progress.isascii()


def test_a_prompt_past_clips_77_tokens_is_logged_short(tiny_pipe, caplog):
    """diffusers logs the whole part of a long prompt that CLIP leaves out (up to the input's 2,000 characters):
    the line is cut at 300 characters and says how long it was."""
    image, mask = pipeline_inputs()
    with caplog.at_level(logging.WARNING):
        pipeline.generate(tiny_pipe, [image], [mask], _job(1, "a chair " * 250))
    (line,) = _diffusers_log(caplog)
    assert line.startswith("The following part of your input was truncated because CLIP can only handle sequences up to 77 tokens: ")
    assert len(line) == 300 + len("... (1,808 characters in all)") and line.endswith("... (1,808 characters in all)")


def test_a_prediction_holds_the_fast_paths_turn_so_the_compile_workers_work_waits_for_it(tiny_weights, tmp_path):
    """generate runs inside FastPath.prediction() (turns.py): a piece of the compile worker's work that asks for
    its turn during the denoising starts only once the prediction is over (max_shapes=0: nothing is compiled)."""
    fast = FastPath(compile="background", cuda_graphs=False, cache_dir=tmp_path / "compiled", max_shapes=0)
    pipe = pipeline.load_pipeline(tiny_weights, torch.device("cpu"), torch.float32, fast)
    worked = []

    def work():
        with fast.compiler.turns.worker():
            worked.append(time.monotonic())

    worker = threading.Thread(target=work)
    steps = []

    def stop():
        steps.append(time.monotonic())
        if len(steps) == 1:
            worker.start()  # free to start at once, were no turn held
        time.sleep(0.1)

    image, mask = pipeline_inputs()
    pipeline.generate(pipe, [image], [mask], _job(4), stop=stop, fast=fast)
    ended = time.monotonic()
    worker.join(10)
    assert len(steps) == 4 and len(worked) == 1 and worked[0] >= ended
    fast.stop()
