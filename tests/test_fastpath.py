"""FastPath's routing on the CPU, as on a GPU (inpaint/fastpath/__init__.py): which calls of the UNet and of
the VAE's encoder and decoder run a compiled part, which run the module's own forward, and what each asks
the compile worker for.

The compiled parts here are real ahead-of-time compiles (compiler.aot_compile, as the compile process
makes them), saved and sealed where a later start looks for them, but with dynamo's "eager" backend in
place of Inductor: seconds instead of a minute each, and exactly the eager part's numbers. A compiled
call is told from an eager one by a forward hook on the part's first convolution, which the traced
function does not call. tests/test_compiled.py compiles with Inductor, in the slow tier."""

import dataclasses
import gc
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from inpaint import fastpath, pipeline
from inpaint.config import Settings
from inpaint.fastpath import FastPath, artifact, compiler, describe
from inpaint.fastpath.graphs import _Failed

from conftest import compiling_pipeline, inductor_cache_variable, run_pipeline, tiny_unet

WAIT = 120  # seconds for the worker to load and check the saved parts (about a second each here)
PARTS = ("unet", "vae.decoder", "vae.encoder")


@pytest.fixture(scope="module", autouse=True)
def _inductor_cache_variable():
    """No deployment's choice of Inductor's cache here: each CompiledPart points it into its own folder."""
    with inductor_cache_variable(None):
        yield


def _installed(tiny_weights, cache_dir: Path, **options):
    """conftest.compiling_pipeline without CUDA graphs (which pass every CPU call through)."""
    return compiling_pipeline(tiny_weights, cache_dir, cuda_graphs=False, **options)


def _eager_runs(pipe) -> Counter:
    """Counts, by part, the calls that ran the module's own forward (a hook on its first convolution)."""
    runs: Counter = Counter()
    for part, module in zip(PARTS, (pipe.unet, pipe.vae.decoder, pipe.vae.encoder)):
        module.conv_in.register_forward_hook(lambda *_, part=part: runs.update([part]))
    return runs


def _obtained(fast: FastPath, keys, how: str) -> bool:
    """Whether each part has obtained exactly the shapes `keys` holds for it, each one `how` ("loaded", "failed")."""
    sources = {name: fast.parts[name].compiled.sources for name in PARTS}
    return sources == {name: dict.fromkeys(keys[name], how) for name in PARTS}


def _same(images, others) -> bool:
    return len(images) == len(others) and all(np.array_equal(a, b) for a, b in zip(images, others))


@pytest.fixture(scope="module")
def saved(tiny_weights, tmp_path_factory):
    """A compile cache holding each part compiled for the shapes one prediction calls it at, as a start that
    compiled them leaves it; those shapes by part; the plain pipeline's images; and those of that prediction,
    with the fast path installed and nothing compiled."""
    model = pipeline.load_pipeline(tiny_weights, torch.device("cpu"), torch.float32)
    plain = run_pipeline(model)
    cache = tmp_path_factory.mktemp("compiled")
    pipe, fast = _installed(tiny_weights, cache)
    fast.stop()  # a worker that has ended: the parts' asks are kept, and nothing is compiled
    asked = run_pipeline(pipe, fast)
    keys = {name: set(part.compiled.requested) for name, part in fast.parts.items()}
    # compiled, as in the compile process, from modules without the fast path's stand-ins (which hold locks,
    # and dynamo's saved guards pickle the module), in the installed layout
    modules = dict(zip(PARTS, (model.unet.to(memory_format=torch.channels_last), model.vae.decoder, model.vae.encoder)))
    for name, part in fast.parts.items():
        for key in keys[name]:
            path = part.compiled.path(key)
            with torch.inference_mode(key.inference):
                made = compiler.aot_compile(modules[name], name, key, backend="eager")
            compiler._save(made, path, modules[name])
            part.compiled.seal.seal(path)
    return cache, keys, plain, asked


def _load(fast: FastPath, keys) -> None:
    """Have the worker load the saved parts for `keys` (as a prediction's calls ask for them), and wait for them."""
    for name in PARTS:
        for key in keys[name]:
            fast.parts[name].compiled.request(key)
    assert fast.wait(WAIT)


@pytest.fixture
def adopted(saved, tiny_weights):
    """A pipeline whose parts have taken up the saved compiled ones, the shapes they were made for, and the
    count of its eager runs (from now on)."""
    cache, keys, *_ = saved
    pipe, fast = _installed(tiny_weights, cache)
    _load(fast, keys)
    with fast.prediction():  # takes up what is ready
        pass
    yield pipe, fast, keys, _eager_runs(pipe)
    fast.stop()


def test_each_part_asks_once_for_each_shape_a_prediction_calls_it_at_and_runs_uncompiled_meanwhile(saved):
    _, keys, plain, asked = saved
    assert {name: sorted(map(str, shapes)) for name, shapes in keys.items()} == {
        "unet": ["4x9x8x8"],  # two outputs, each with and without the prompt (guidance), 64x64 photo / 8
        "vae.decoder": ["1x4x8x8"],  # the sliced VAE decodes one output at a time
        "vae.encoder": ["1x3x64x64"],  # the masked photo, once for both outputs
    }
    assert all(key.inference for shapes in keys.values() for key in shapes)
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(plain, asked))  # channels_last and the sliced VAE: rounding


def test_a_saved_part_is_loaded_once_a_prediction_asks_and_the_next_prediction_runs_it(saved, tiny_weights, caplog):
    cache, keys, _, uncompiled = saved
    caplog.set_level(logging.INFO, logger="inpaint.fastpath")
    pipe, fast = _installed(tiny_weights, cache)
    eager = _eager_runs(pipe)
    try:
        assert _same(uncompiled, run_pipeline(pipe, fast))
        assert eager == {"unet": 4, "vae.decoder": 2, "vae.encoder": 1}  # 4 steps, 2 outputs: every call uncompiled
        assert fast.wait(WAIT)
        assert _obtained(fast, keys, "loaded")
        assert [re.sub(r"in \d+\.\d s", "in N s", message) for message in caplog.messages] == [
            f"{describe(name, key)} loaded in N s; predictions use it from the next one" for name in PARTS for key in keys[name]]
        caplog.clear()
        assert fast.in_use() == []  # loaded, not yet taken up
        eager.clear()
        second = run_pipeline(pipe, fast)
        assert not eager  # every call ran its compiled part
        assert _same(uncompiled, second)  # dynamo's eager backend: the eager part's very numbers
        named = [describe(name, key) for name in PARTS for key in keys[name]]
        assert fast.in_use() == sorted(named) == ["UNet for latents 4x9x8x8", "VAE decoder for latents 1x4x8x8",
                                                  "VAE encoder for images 1x3x64x64"]
        assert [f"this prediction uses the compiled {name}" for name in named] == [
            message for message in caplog.messages if "uses the compiled" in message]
    finally:
        fast.stop()


def test_a_part_that_cannot_be_had_stays_uncompiled_is_not_asked_for_again_and_the_log_says_why(tiny_weights, tmp_path,
                                                                                                caplog, monkeypatch):
    monkeypatch.setattr(compiler, "COMPILE_TIMEOUT", 0.05)  # each compile process is stopped before it imports torch
    caplog.set_level(logging.INFO, logger="inpaint.fastpath")
    pipe, fast = _installed(tiny_weights, tmp_path)  # nothing saved here: each part is compiled
    eager = _eager_runs(pipe)
    try:
        first = run_pipeline(pipe, fast)
        assert fast.wait(WAIT)
        asked = {name: set(part.compiled.requested) for name, part in fast.parts.items()}
        assert _obtained(fast, asked, "failed")
        assert caplog.messages == [
            f"compiled {describe(name, key)} not available (RuntimeError: the compile process took longer than 0.05 s and "
            "was stopped); that shape runs uncompiled" for name in PARTS for key in asked[name]]  # the UNet first
        eager.clear()
        assert _same(first, run_pipeline(pipe, fast)) and eager == {"unet": 4, "vae.decoder": 2, "vae.encoder": 1}
        assert {name: part.compiled.requested for name, part in fast.parts.items()} == asked and fast.in_use() == []
    finally:
        fast.stop()


def test_a_saved_part_that_disagrees_with_the_eager_one_is_not_used_and_the_log_says_by_how_much(saved, tiny_weights,
                                                                                                caplog, monkeypatch):
    cache, keys, *_ = saved
    monkeypatch.setattr(compiler, "MAX_RELATIVE_ERROR", -1.0)  # no part can agree closely enough
    caplog.set_level(logging.WARNING, logger="inpaint.fastpath")
    _, fast = _installed(tiny_weights, cache)
    try:
        _load(fast, keys)
        assert _obtained(fast, keys, "failed")
        assert fast.compiled_parts[0].path(*keys["unet"]).exists()  # refused, not moved aside: it loaded as saved
        assert [re.sub(r"by \d\.\d\de[-+]\d\d ", "by E ", message) for message in caplog.messages] == [
            f"compiled {describe(name, key)} not available (RuntimeError: it differs from the eager {compiler.PARTS[name].name} "
            "by E (relative L2; at most -1.0 allowed)); that shape runs uncompiled" for name in PARTS for key in keys[name]]
    finally:
        fast.stop()


def test_a_saved_part_that_agrees_exactly_is_used_even_with_no_tolerance(saved, tiny_weights, monkeypatch):
    cache, keys, *_ = saved
    monkeypatch.setattr(compiler, "MAX_RELATIVE_ERROR", 0.0)  # dynamo's eager backend gives the eager part's numbers
    _, fast = _installed(tiny_weights, cache)
    try:
        _load(fast, keys)
        assert _obtained(fast, keys, "loaded")
    finally:
        fast.stop()


def test_a_stopped_compiler_does_no_more_work_not_even_the_job_it_had_taken(saved, tiny_weights):
    cache, keys, *_ = saved
    _, fast = _installed(tiny_weights, cache)
    unet = fast.parts["unet"].compiled
    with fast.compiler.turns.prediction():  # the worker takes the job, then waits for this turn to end
        unet.request(*keys["unet"])
        fast.compiler.stop(timeout=0.1)  # the worker waits for this turn: stop does not wait for it
    fast.compiler._worker.join(WAIT)
    assert not fast.compiler._worker.is_alive() and unet.sources == {} and not unet.ready  # nothing loaded


def test_a_compiler_stopped_before_anything_was_asked_starts_no_worker(tiny_weights, tmp_path):
    pipe, fast = _installed(tiny_weights, tmp_path)
    fast.stop()
    run_pipeline(pipe, fast)  # its calls ask for their shapes
    assert all(part.requested for part in fast.compiled_parts)
    assert fast.compiler._worker is None  # nor an exit hook registered again


def test_a_stopped_compiler_is_freed_with_its_fast_path(saved, tiny_weights):
    """stop() takes its exit hook back, which would otherwise keep it (and every part it compiled for)
    alive to the end of the process: the bake and the tests make and stop one after another."""
    cache, keys, *_ = saved
    pipe, fast = _installed(tiny_weights, cache)
    _load(fast, keys)  # the worker has run, and loaded a part of each kind
    fast.stop()
    encoder = fast.parts["vae.encoder"].compiled
    other = dataclasses.replace(*keys["vae.encoder"], inference=False)
    encoder.request(other)
    encoder.work(other)  # and failed one: its warning, which the log's handlers may keep, holds no traceback
    freed = weakref.ref(fast.compiler)
    del pipe, fast, encoder
    gc.collect()
    assert freed() is None


def test_a_part_is_idle_only_once_every_shape_asked_of_it_is_done(saved, tiny_weights):
    cache, keys, *_ = saved
    _, fast = _installed(tiny_weights, cache)
    fast.stop()  # no worker: the test does the worker's jobs, one at a time
    encoder = fast.parts["vae.encoder"].compiled
    (key,) = keys["vae.encoder"]
    other = dataclasses.replace(key, inference=False)  # never saved
    encoder.request(key)
    encoder.request(other)
    encoder.work(key)
    assert not encoder.wait(0)  # the other shape is still to do
    encoder.work(other)  # it would be compiled, but the stopped compiler starts no process
    assert encoder.wait(0) and encoder.sources == {key: "loaded", other: "failed"}


def test_an_unsealed_inductor_cache_in_the_fast_paths_folder_is_moved_aside_at_install(tiny_weights, tmp_path):
    (tmp_path / "cache" / "inductor").mkdir(parents=True, mode=0o700)
    (tmp_path / "cache").chmod(0o700)
    (tmp_path / "cache" / "inductor" / "k.py").write_text("import os; os.system('touch /tmp/pwned')")  # planted
    with inductor_cache_variable(None):
        _, fast = _installed(tiny_weights, tmp_path / "cache")
    fast.stop()
    (aside,) = (tmp_path / "cache").glob("inductor.rejected-*")
    assert (aside / "k.py").exists() and not any((tmp_path / "cache" / "inductor").iterdir())


def test_a_part_that_cannot_be_saved_leaves_no_partial_file_and_says_why(tmp_path):
    with pytest.raises(AttributeError, match="save_compiled_function"):
        compiler._save(object(), tmp_path / "part.aot", torch.nn.Linear(2, 2))  # not a compiled function
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_saved_part_is_moved_aside_and_compiled_again(saved, tiny_weights, tmp_path, caplog, monkeypatch):
    cache, keys, *_ = saved
    shutil.copytree(cache, tmp_path / "cache")  # the shared cache stays whole
    monkeypatch.setattr(compiler, "COMPILE_TIMEOUT", 0.05)  # the compile that follows is stopped at once
    caplog.set_level(logging.WARNING, logger="inpaint.fastpath")
    _, fast = _installed(tiny_weights, tmp_path / "cache")
    try:
        path = fast.parts["unet"].compiled.path(*keys["unet"])
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
        _load(fast, keys)
        assert [list(fast.parts[name].compiled.sources.values()) for name in PARTS] == [["failed"], ["loaded"], ["loaded"]]
        (aside,) = path.parent.glob(f"{path.name}.rejected-*[0-9]")
        assert aside.read_bytes() == bytes(data) and not path.exists()  # kept for inspection, and nothing saved in its place
        [moved, failed] = caplog.messages
        assert re.fullmatch(rf"saved compiled UNet {re.escape(path.name)} not loaded \(UntrustedCache: .+\); moved aside to "
                            rf"{re.escape(aside.name)}, compiling it again", moved), moved
        assert failed.startswith(f"compiled {describe('unet', *keys['unet'])} not available (RuntimeError: the compile process")
        # named as py-spy and bench/gil.py report it; a daemon, so that it never holds the process at exit (Python
        # waits for the others before the exit hooks that would stop it)
        assert any(thread.name == "compile-worker" and thread.daemon for thread in threading.enumerate())
    finally:
        fast.stop()


def test_saved_parts_are_keyed_by_their_config_not_its_order_and_by_their_layout(saved, tiny_weights):
    cache, keys, *_ = saved
    _, fast = _installed(tiny_weights, cache)
    fast.stop()
    part, (key,) = fast.parts["vae.decoder"].compiled, keys["vae.decoder"]
    assert re.fullmatch(r"vae-decoder-[0-9a-f]{20}\.aot", part.path(key).name)  # the names an artifact's manifest lists
    other = compiler.CompiledPart(part.module, "vae.decoder", part.compiler, cache, config={**part.config, "norm_num_groups": 1})
    assert other.path(key) != part.path(key) and other.path(key).parent == part.path(key).parent
    reordered = compiler.CompiledPart(part.module, "vae.decoder", part.compiler, cache, config=dict(reversed(part.config.items())))
    assert reordered.path(key) == part.path(key)  # a config read elsewhere (a bake's) may list its entries in another order
    elsewhere = compiler.CompiledPart(part.module, "vae.decoder", part.compiler, cache,
                                      config={**part.config, "_name_or_path": "/srv/weights/vae"})
    assert elsewhere.path(key) == part.path(key)  # not the folder it was loaded from: an artifact is baked from another
    unet, (key,) = fast.parts["unet"].compiled, keys["unet"]
    channels_last = unet.path(key)  # as installed
    unet.module.to(memory_format=torch.contiguous_format)
    assert unet.path(key) != channels_last  # compiled code is made for one memory layout
    contiguous = unet.path(key)
    unet.module.to(torch.float16)
    assert unet.path(key) != contiguous  # for one dtype of the weights
    half = unet.path(key)
    unet.module.to("meta")
    assert unet.path(key) != half  # and for one kind of device


def test_a_part_asks_for_at_most_its_limit_of_shapes_and_each_once(tiny_weights, tmp_path):
    pipe, fast = _installed(tiny_weights, tmp_path, max_shapes=2)
    fast.stop()  # asked for, never compiled
    part = fast.parts["vae.decoder"].compiled
    with torch.inference_mode():
        for side in (8, 8, 16, 24, 8, 32):
            pipe.vae.decoder(torch.randn(1, 4, side, side))
        assert sorted(key.shape[-1] for key in part.requested) == [8, 16]  # the first two
        part.request(fastpath.ShapeKey.of(torch.randn(1, 4, 40, 40)), over_limit=True)  # a shipped part's load
    assert sorted(key.shape[-1] for key in part.requested) == [8, 16, 40]


def test_waiting_for_a_part_the_worker_will_not_get_to_ends_at_its_timeout(saved, tiny_weights, tmp_path):
    _, keys, *_ = saved
    _, fast = _installed(tiny_weights, tmp_path)
    fast.stop()  # asked for from now on, never compiled
    fast.parts["unet"].compiled.request(*keys["unet"])
    assert not fast.wait(0.1) and not fast.parts["unet"].compiled.wait(0.1)


def test_once_stopped_the_compiler_starts_no_compile_process(saved, tiny_weights, tmp_path, monkeypatch):
    """stop() ends the compile processes running; a job the worker began before it (a saved part that failed
    to load, about to be compiled again) starts none after it."""
    monkeypatch.setattr(compiler, "COMPILE_TIMEOUT", 0.05)  # one that did start would be stopped at once
    _, keys, *_ = saved
    _, fast = _installed(tiny_weights, tmp_path)
    fast.stop()
    with pytest.raises(RuntimeError, match=r"^no compile process was started: this process is exiting$"):
        fast.compiler.compile_in_child(fast.parts["unet"].compiled, *keys["unet"], tmp_path / "unet.aot")
    assert not fast.compiler.children and not (tmp_path / "unet.aot").exists()


def test_only_plain_inference_calls_of_the_shape_it_was_made_for_run_the_compiled_unet(adopted):
    pipe, fast, keys, eager = adopted
    unet, (key,) = pipe.unet, keys["unet"]
    asked = set(fast.parts["unet"].compiled.requested)
    with torch.inference_mode():
        sample, timestep, states = key.example()
        want = type(unet).forward(unet, sample, timestep, states, return_dict=False)[0]  # the module's own
        mask = torch.ones(states.shape[:2])  # a mask over the prompt's last tokens changes the output
        mask[:, 40:] = 0
        masked = type(unet).forward(unet, sample, timestep, states, encoder_attention_mask=mask, return_dict=False)[0]
        assert not torch.equal(masked, want)
        eager.clear()
        output = unet(sample, timestep, encoder_hidden_states=states)
        assert isinstance(output, UNet2DConditionOutput) and torch.equal(output.sample, want)
        output = unet(sample, timestep, states, return_dict=False, timestep_cond=None, added_cond_kwargs={})
        assert isinstance(output, tuple) and len(output) == 1 and torch.equal(output[0], want)
        assert not eager  # both compiled: empty extra inputs are plain
        eager_calls = [
            lambda: unet(sample, 500, states),  # a timestep that is not a tensor
            lambda: unet(sample, timestep, states, None),  # an input past the three (class_labels)
            lambda: unet(sample, timestep, states, cross_attention_kwargs={"scale": 1.0}),  # a non-empty extra input
        ]
        for count, call in enumerate(eager_calls, 1):
            assert torch.equal(call().sample, want) and eager["unet"] == count
        # the module's own forward gets every input as given: the mask by keyword, and by position (the twelfth)
        assert torch.equal(unet(sample, timestep, states, encoder_attention_mask=mask, return_dict=False)[0], masked)
        assert torch.equal(unet(sample, timestep, states, *[None] * 8, mask).sample, masked) and eager["unet"] == 5
    plain_tensors = [value.clone() for value in (sample, timestep, states)]
    with torch.enable_grad():  # autograd on: the module's own forward, which autograd can go back through
        output = unet(*plain_tensors, return_dict=False)
        assert isinstance(output, tuple) and output[0].requires_grad and torch.equal(output[0].detach(), want)
    assert eager["unet"] == 6
    assert fast.parts["unet"].compiled.requested == asked  # none of these asked for anything
    fast.stop()  # so that the ask below starts no compile (a minute of a core, for nothing)
    with torch.inference_mode():
        larger = torch.randn(4, 9, 16, 16)
        expected = type(unet).forward(unet, larger, timestep, states)[0]
        eager.clear()
        assert torch.equal(unet(larger, timestep, states).sample, expected)
    assert eager["unet"] == 1 and len(fast.parts["unet"].compiled.requested - asked) == 1  # a new shape: uncompiled, asked for


def test_only_one_tensor_in_runs_the_compiled_vae_decoder(adopted):
    pipe, fast, keys, eager = adopted
    decoder, (key,) = pipe.vae.decoder, keys["vae.decoder"]
    with torch.inference_mode():
        (latents,) = key.example()
        want = type(decoder).forward(decoder, latents)
        eager.clear()
        assert torch.equal(decoder(latents), want) and torch.equal(decoder(latents, latent_embeds=None), want)
        assert not eager
        assert torch.equal(decoder(latents, None), want) and eager == {"vae.decoder": 1}  # a second input
    with torch.enable_grad():
        assert torch.equal(decoder(latents.clone()).detach(), want)
    assert eager == {"vae.decoder": 2} and fast.parts["vae.decoder"].compiled.requested == keys["vae.decoder"]


def test_a_rejected_compiled_shape_runs_uncompiled_for_a_while_then_the_next_prediction_takes_it_up_again(adopted, caplog):
    """What the UNet's part does when its CUDA graph cannot be recorded from the compiled part (compiler.py)."""
    pipe, fast, keys, eager = adopted
    part, (key,) = fast.parts["unet"].compiled, keys["unet"]
    part.reject(key, retry_after_calls=3)
    with torch.inference_mode(), caplog.at_level(logging.INFO, logger="inpaint.fastpath"):
        sample, timestep, states = key.example()
        for count in range(1, 4):
            pipe.unet(sample, timestep, states)
            assert eager["unet"] == count
            assert ("handed over again" in caplog.text) == (count == 3)  # by the last call of its wait
        assert caplog.messages == [f"the compiled {describe('unet', key)} is handed over again, after its CUDA graph failed"]
        pipe.unet(sample, timestep, states)  # handed over: taken up by the next prediction, not half-way through one
        assert eager["unet"] == 4
        with fast.prediction():
            pipe.unet(sample, timestep, states)
    assert eager["unet"] == 4


def test_a_request_the_service_serves_takes_up_the_compiled_parts_that_are_ready(saved, tiny_weights, tiny_settings,
                                                                                 tmp_path, caplog):
    """The service hands its fast path to each generation: a request at the shapes the parts were saved for
    (run_pipeline's: a 64x64 photo, two outputs) takes them up, and no part runs its own forward."""
    from inpaint.inputs import check_inputs
    from inpaint.service import Inpainter

    from conftest import pipeline_inputs

    cache, keys, *_ = saved
    pipe, fast = _installed(tiny_weights, cache)
    try:
        _load(fast, keys)  # ready, not yet taken up
        eager = _eager_runs(pipe)
        for picture, name in zip(pipeline_inputs(), ("photo.png", "mask.png")):
            picture.save(tmp_path / name)
        request = check_inputs(num_outputs=2, num_inference_steps=2, width=64, height=64, seed=3)
        with caplog.at_level(logging.INFO, logger="inpaint.fastpath"):
            Inpainter(pipe, tiny_settings, None, fast).inpaint(tmp_path / "photo.png", tmp_path / "mask.png", request,
                                                               tmp_path)
        assert eager == Counter()
        taken = [record.getMessage() for record in caplog.records if record.name == "inpaint.fastpath"]
        assert sorted(taken) == sorted(f"{fastpath.TAKE_UP}{describe(name, key)}" for name in PARTS for key in keys[name])
    finally:
        fast.stop()


def test_a_shape_rejected_before_a_prediction_took_it_up_waits_out_its_calls_too(saved, tiny_weights):
    cache, keys, *_ = saved
    pipe, fast = _installed(tiny_weights, cache)
    try:
        _load(fast, keys)  # loaded and checked: ready, not yet taken up
        eager = _eager_runs(pipe)
        part, (key,) = fast.parts["unet"].compiled, keys["unet"]
        part.reject(key, retry_after_calls=1)
        with fast.prediction():
            assert key not in part.adopted and key in part.set_aside  # not taken up meanwhile
        with torch.inference_mode(), fast.prediction():
            pipe.unet(*key.example())  # its one call uncompiled, which hands it over again
        with fast.prediction():
            assert key in part.adopted and eager["unet"] == 1
    finally:
        fast.stop()


def test_the_warm_up_asks_for_the_parts_a_one_output_prediction_at_its_size_runs(tiny_weights, tmp_path, caplog):
    """What setup's warm-up is for on a GPU, besides CUDA's first-use costs: the compiled parts of the most
    common request (one output at 512x512; here, at 64x64) asked for before the first prediction."""
    pipe, fast = _installed(tiny_weights, tmp_path)
    fast.stop()  # the asks are kept; nothing is compiled
    with caplog.at_level(logging.INFO, logger="inpaint.fastpath"):
        seconds = fastpath.warm_up(pipe, fast, size=64)
    assert 0 < seconds < WAIT and f"warm-up inpainting at 64x64: {seconds:.1f} s" in caplog.messages
    assert {name: sorted(map(str, part.compiled.requested)) for name, part in fast.parts.items()} == {
        "unet": ["2x9x8x8"], "vae.decoder": ["1x4x8x8"], "vae.encoder": ["1x3x64x64"]}  # with and without the prompt


def test_the_warm_up_is_a_prediction_that_takes_up_the_parts_ready(saved, tiny_weights):
    """With INPAINT_COMPILE=setup, setup warms up again once its parts are ready, to record the compiled UNet's
    CUDA graph: the warm-up takes them up as a prediction does (the VAE's here: the UNet's shape is a two-output one)."""
    cache, *_ = saved
    pipe, fast = _installed(tiny_weights, cache)
    try:
        run_pipeline(pipe, fast)  # asks for them
        assert fast.wait(WAIT)  # ready, not yet taken up
        eager = _eager_runs(pipe)
        fastpath.warm_up(pipe, fast, size=64)
        assert eager == {"unet": 2}  # one output's UNet calls, at a shape not compiled; the VAE's ran compiled
    finally:
        fast.stop()


@pytest.fixture(scope="module")
def shipped(saved, tiny_weights, tmp_path_factory):
    """compiled/ as script/bake-compiled writes it (artifact.write), from parts that loaded the saved ones."""
    cache, keys, *_ = saved
    _, fast = _installed(tiny_weights, cache)
    _load(fast, keys)
    folder = tmp_path_factory.mktemp("weights") / artifact.FOLDER
    artifact.write(fast.compiled_parts, folder, torch.device("cpu"))
    fast.stop()
    return folder


def _took_up(caplog, count: int, size: str, rest: str = "") -> bool:
    """Whether setup logged that it took up `count` shipped parts at `size` in a plausible time, then `rest`."""
    pattern = rf"setup took up the {count} shipped compiled parts at {size} in (\d+\.\d) s{re.escape(rest)}"
    found = [re.fullmatch(pattern, record.getMessage()) for record in caplog.records]
    return any(match and float(match.group(1)) < WAIT for match in found)


def _shipping(tiny_weights, tmp_path, folder, **options):
    """A pipeline set up as on a GPU with compiled parts shipped in `folder` (baked into the image, unless the
    options say otherwise)."""
    fast = FastPath(**{"compile": "background", "cuda_graphs": False, "cache_dir": tmp_path / "cache", "artifact": folder,
                       "artifact_trusted": True, **options})
    return pipeline.load_pipeline(tiny_weights, torch.device("cpu"), torch.float32, fast), fast


def test_shipped_parts_at_setups_size_are_loaded_before_setup_ends_beyond_the_compile_limit(shipped, saved, tiny_weights,
                                                                                            tmp_path, caplog):
    _, keys, _, uncompiled = saved
    with caplog.at_level(logging.INFO, logger="inpaint.fastpath"):
        # no shape may be compiled, but loads may; the cache sealed with the deployment's key
        pipe, fast = _shipping(tiny_weights, tmp_path, shipped, max_shapes=0, secret="a secret")
        eager = _eager_runs(pipe)
        try:
            assert fast.load_shipped(WAIT, size=64)  # the size setup waits for: here that of the shipped parts
            assert f"compiled parts shipped with the weights: 3, checked and copied into {tmp_path / 'cache'}; setup " \
                   "loads those at 512x512, and the rest load after it" in caplog.text
            assert _took_up(caplog, 3, "64x64") and "not loaded as shipped" not in caplog.text
            assert _obtained(fast, keys, "loaded")
            assert eager == dict.fromkeys(PARTS, 1)  # each checked against its eager part on one input
            eager.clear()
            assert _same(uncompiled, run_pipeline(pipe, fast)) and not eager  # the first prediction runs compiled
        finally:
            fast.stop()


def test_setup_waits_only_for_the_shipped_parts_at_its_own_size_and_the_others_load_after_it(shipped, tiny_weights,
                                                                                             tmp_path, caplog):
    pin = hashlib.sha256((shipped / artifact.MANIFEST).read_bytes()).hexdigest()  # as if it came in COG_WEIGHTS, pinned
    pipe, fast = _shipping(tiny_weights, tmp_path, shipped, max_shapes=0, artifact_trusted=False, artifact_pin=pin)
    assert sorted(fast.working_size(part, key) for part, key in fast.shipped) == [(64, 64)] * 3  # latents x 8, images
    try:
        with caplog.at_level(logging.INFO, logger="inpaint.fastpath"):
            assert fast.load_shipped(WAIT)
            assert _took_up(caplog, 0, "512x512", "; the other 3 load in the background")
            assert [len(part.requested) for part in fast.compiled_parts] == [1, 1, 1]  # asked for, not waited for
            assert fast.wait(WAIT)
            run_pipeline(pipe, fast)
        assert caplog.text.count("this prediction uses the compiled") == 3
    finally:
        fast.stop()


@pytest.mark.parametrize("options, why", [({"enabled": False}, "the fast path is off (no GPU here, or INPAINT_FAST_PATH=0)"),
                                          ({"compile": "off"}, "INPAINT_COMPILE=off")])
def test_shipped_parts_a_fast_path_that_compiles_nothing_does_not_use_say_why(shipped, tiny_weights, tmp_path, caplog,
                                                                             options, why):
    with caplog.at_level(logging.INFO, logger="inpaint.fastpath"):
        _, fast = _shipping(tiny_weights, tmp_path, shipped, **options)
    assert caplog.messages == [f"compiled parts shipped with the weights not used: {why}"]
    assert fast.shipped == [] and not (tmp_path / "cache").exists()  # nothing read, nothing copied


def test_shipped_parts_neither_baked_in_nor_pinned_are_not_used(shipped, tiny_weights, tmp_path, caplog):
    """A FastPath trusts an artifact only when told: by default it is one that came from outside the image."""
    fast = FastPath(compile="background", cuda_graphs=False, cache_dir=tmp_path / "cache", artifact=shipped)
    with caplog.at_level(logging.WARNING, logger="inpaint.fastpath"):
        pipeline.load_pipeline(tiny_weights, torch.device("cpu"), torch.float32, fast)
    fast.stop()
    assert not fast.shipped and "not used: it did not come with the image and its manifest is not pinned" in caplog.text


def test_a_pin_without_shipped_parts_is_logged_and_the_parts_compile_in_the_background(tiny_weights, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="inpaint.fastpath"):
        _, fast = _installed(tiny_weights, tmp_path, artifact_pin="ab" * 32)
    fast.stop()
    assert "INPAINT_COMPILED_MANIFEST_SHA256 is set but the weights hold no compiled parts (compiled/); predictions " \
           "compile in the background" in caplog.text
    assert not fast.shipped and fast.load_shipped()


def test_the_deployments_settings_reach_its_fast_path(tmp_path):
    settings = Settings(compile="setup", cuda_graphs=False, compile_cache=tmp_path / "cache", compile_cache_key="a secret",
                        compiled_manifest_sha256="ab" * 32)
    fast = FastPath.for_device(torch.device("cuda"), settings, artifact=tmp_path / "compiled", artifact_trusted=True)
    assert (fast.enabled, fast.compile, fast.cuda_graphs, fast.cache_dir, fast.secret) == (
        True, "setup", False, tmp_path / "cache", "a secret")
    assert fast.artifact == (tmp_path / "compiled", True, "ab" * 32)
    assert FastPath.for_device(torch.device("cuda"), Settings()).artifact == (None, False, "")  # untrusted, unpinned


def test_each_compiled_part_keeps_its_shapes_in_the_fast_paths_folder_sealed_with_its_key(tiny_weights, tmp_path):
    with inductor_cache_variable(None):  # as a new process, where no part has pointed it at its folder yet
        pipe, fast = _installed(tiny_weights, tmp_path / "cache", secret="a secret", max_shapes=3)
        kernels = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    try:
        for part in fast.compiled_parts:
            assert part.cache_dir == tmp_path / "cache" and part.max_shapes == 3
            assert part.seal.folder == tmp_path / "cache" and part.seal.key == b"a secret"
        assert fast.vae_scale == pipe.vae_scale_factor
        assert kernels == str(tmp_path / "cache" / "inductor")  # Inductor's kernels beside them: no deployment chose a folder
    finally:
        fast.stop()
    assert fast.compiler._exiting.is_set()


def test_only_the_unet_and_the_vaes_parts_are_compiled():
    module = torch.nn.Linear(2, 2)
    forward = module.forward
    with pytest.raises(ValueError) as refused:
        compiler.CompiledPart(module, "text_encoder", compiler.Compiler(), config={})
    assert str(refused.value) == "part 'text_encoder' must be one of unet, vae.decoder, vae.encoder"
    assert module.forward == forward


def test_an_unusable_cache_folder_falls_back_to_a_temporary_one(tiny_weights, tmp_path, caplog):
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")
    unet = tiny_unet(tiny_weights, "cpu")
    caplog.clear()  # diffusers' own warnings while loading it
    with caplog.at_level(logging.WARNING, logger="inpaint.fastpath.compiler"):
        part = compiler.CompiledPart(unet, "unet", compiler.Compiler(), blocked / "compiled")
    assert part.cache_dir.is_dir() and part.cache_dir.name.startswith("inpaint-compiled-")
    assert caplog.messages == [f"compiled parts cannot be kept in {blocked / 'compiled'} ([Errno 20] Not a directory: "
                               f"'{blocked / 'compiled'}'); they are kept for this process only"]


def test_the_cache_is_checked_and_written_in_its_own_folder_not_through_the_systems_temporary_one(saved, tiny_weights,
                                                                                               tmp_path, monkeypatch):
    """A part is saved through a partial file beside it, so that its rename is atomic: the system's temporary
    folder may be another file system (a rename across two fails), or full."""
    _, keys, *_ = saved
    decoder = AutoencoderKL.from_pretrained(tiny_weights, subfolder="vae", variant="fp16").eval().decoder
    (key,) = keys["vae.decoder"]
    with torch.inference_mode(key.inference):
        made = compiler.aot_compile(decoder, "vae.decoder", key, backend="eager")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "absent"))  # any file made there fails
    folder = compiler.usable_folder(tmp_path / "cache")
    assert folder == tmp_path / "cache"
    compiler._save(made, folder / "vae" / "decoder" / "part.aot", decoder)  # its folders made as needed
    assert sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")) == ["vae", "vae/decoder",
                                                                                         "vae/decoder/part.aot"]
    assert (folder / "vae" / "decoder").stat().st_mode & 0o777 == 0o700  # the part's own folder private, as cachetrust checks


def test_a_compile_process_that_fails_says_why_in_its_own_last_words(tiny_weights, tmp_path):
    """A real compile process, handed a config it cannot build its part from: the error names its exit code and
    the last line it wrote (a traceback's, the exception)."""
    vae = AutoencoderKL.from_pretrained(tiny_weights, subfolder="vae", variant="fp16").eval()
    part = compiler.CompiledPart(vae.decoder, "vae.decoder", compiler.Compiler(), tmp_path,
                                 config={**vae.config, "norm_num_groups": 7})  # its channels are 8 and 16
    with pytest.raises(RuntimeError) as failed:
        part.compiler.compile_in_child(part, fastpath.ShapeKey.of(torch.randn(1, 4, 8, 8)), tmp_path / "part.aot")
    assert str(failed.value) == ("the compile process ended with code 1: ValueError: num_channels (8) must be divisible "
                                 "by num_groups (7)")
    assert not part.compiler.children and not (tmp_path / "part.aot").exists()


def test_relative_error_is_the_l2_distance_over_the_references_norm():
    reference = torch.tensor([3.0, 4.0], dtype=torch.float16)
    assert compiler.relative_error(reference, reference) == 0.0
    assert compiler.relative_error(reference * 2, reference) == 1.0
    assert compiler.relative_error(torch.tensor([3.0, 4.5]), reference) == pytest.approx(0.1)
    assert compiler.relative_error(torch.ones(2), torch.zeros(2)) == pytest.approx(2 ** 0.5 * 1e12)  # no division by 0


def test_release_drops_the_unets_graphs(tiny_weights):
    pipe = pipeline.load_pipeline(tiny_weights, torch.device("cpu"), torch.float32)
    fast = FastPath().install(pipe)
    graphs = fast.parts["unet"].graphs
    graphs.graphs["a key"] = _Failed(1)
    fast.release()
    assert not graphs.graphs
    assert fast.compiler is None and isinstance(fast.turn(), nullcontext)  # graphs alone: no worker to take turns with
    with fast.prediction():
        pass
    FastPath(False).stop()  # nothing to stop

