"""The cold start's garbage collector pause: nothing collected inside, cycles freed on the way out, the
collector as it was afterwards; and a fresh process's setup runs one collection in all, with what the
imports made frozen and the model's objects not."""

import gc
import json
import subprocess
import sys
import weakref

import pytest

from conftest import ROOT
from inpaint.startup import collector_paused


class _Node:
    pass


def _cycle() -> weakref.ref:
    """An object only a reference cycle keeps alive, as a weak reference."""
    node = _Node()
    node.itself = node
    return weakref.ref(node)


@pytest.fixture
def collector_on():
    was_enabled = gc.isenabled()
    gc.enable()
    yield
    if not was_enabled:
        gc.disable()


def test_nothing_is_collected_inside_and_the_cycles_made_there_are_freed_on_the_way_out(collector_on):
    with collector_paused():
        assert not gc.isenabled()
        node = _cycle()
        kept = [[] for _ in range(10 * gc.get_threshold()[0])]  # would start collections with the collector on
        assert node() is not None
        del kept
    assert node() is None
    assert gc.isenabled()


def test_the_collector_is_restored_after_an_error_and_stays_off_if_it_was_off(collector_on):
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("setup failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            node = _cycle()
        assert node() is None
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.slow
def test_a_fresh_setup_collects_once_freezes_the_imports_and_leaves_the_model_collectable(tiny_weights):
    """Predictor.setup in a new interpreter, as Cog's worker runs it: imports, weights, model, safety
    checker. Without the pause the same setup runs dozens of collections (each import adds objects)."""
    code = (
        "import gc, json, sys\n"
        "import predict\n"
        "runs = []\n"
        "gc.callbacks.append(lambda phase, info: phase == 'start' and runs.append(info['generation']))\n"
        "predictor = predict.Predictor()\n"
        "predictor.setup(sys.argv[1])\n"
        "collectable = {id(o) for o in gc.get_objects()}\n"  # every generation but the frozen objects
        "unet = predictor.inpainter.pipe.unet\n"
        "print(json.dumps({'collections': runs, 'enabled': gc.isenabled(), 'frozen': gc.get_freeze_count(),\n"
        "    'model collectable': id(unet) in collectable and id(unet.conv_in) in collectable,\n"
        "    'torch frozen': id(sys.modules['torch'].nn.Module) not in collectable}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tiny_weights)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen.pop("frozen") > 100_000
    assert seen == {"collections": [2], "enabled": True, "model collectable": True, "torch frozen": True}
