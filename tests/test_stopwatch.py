"""The one stopwatch (inpaint/stopwatch.py): wall time on the CPU, CUDA events on a GPU."""

from __future__ import annotations

import time

import pytest

from inpaint.stopwatch import Stopwatch


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_stages_add_up_per_name_a_stage_that_raises_counts_and_a_read_is_a_copy(device):
    """The host sleeps inside each stage: on CUDA the stage's end event is queued after the sleep, so the
    GPU's clock sees it too. A sleep never ends early, so each stage takes at least its sleeps."""
    watch = Stopwatch(device)
    started = time.perf_counter()
    for _ in range(2):
        with watch.time("a"):
            time.sleep(0.02)
    with pytest.raises(ValueError, match="inside"):
        with watch.time("b"):
            time.sleep(0.01)
            raise ValueError("inside")
    first = watch.read()
    wall = time.perf_counter() - started
    assert set(first) == {"a", "b"}
    assert first["a"] >= 0.04 and first["b"] >= 0.01 and first["a"] + first["b"] <= wall
    assert watch.read() == first  # read again: nothing counted twice
    b = first["b"]
    first["a"] = 0.0  # the caller's copy: the watch's own sums go on
    with watch.time("a"):
        time.sleep(0.01)
    later = watch.read()
    assert later["a"] >= 0.05 and later["b"] == b


def test_a_watch_made_without_a_device_times_the_cpu_by_wall_time():
    watch = Stopwatch()
    with watch.time("stage"):
        time.sleep(0.01)
    assert watch.device.type == "cpu" and watch.read()["stage"] >= 0.01
