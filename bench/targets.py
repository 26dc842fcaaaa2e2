"""Issue 20's figures in one device run: the compiled parts baked and shipped, a fresh server on them
through HTTP, the default path against diffusers' reference, part 4's candidates, every working shape."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import candidates
import comparison
import coldstart
import report
import workload
from timing import median_stages
from workload import ROOT

from inpaint.pipeline import pick_device
from inpaint.weights import manifest_pin


def bake(folder: Path, size: int, timeout: float | None = None) -> tuple[str, float]:
    """script/bake-compiled at size x size into folder/compiled/: its manifest's sha256 and the seconds it took
    (RuntimeError when it fails, or does not end within `timeout` seconds)."""
    env = {**os.environ, "INPAINT_WEIGHTS_MANIFEST_SHA256": manifest_pin(folder)}
    begin = time.monotonic()
    try:
        baked = subprocess.run([sys.executable, str(ROOT / "script" / "bake-compiled"), "--weights", str(folder), "--shapes",
                                f"{size}x{size}"], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:  # its compile processes end with it (they watch their parent)
        raise RuntimeError(f"the bake did not end within {timeout:.0f} s and was stopped") from None
    bake_s = time.monotonic() - begin
    if baked.returncode != 0:
        raise RuntimeError(f"the bake failed: {baked.stderr[-1500:]}")
    pin = baked.stdout.strip().rsplit(" ", 1)[-1]
    report.progress(f"baked {size}x{size} in {bake_s:.0f} s; manifest {pin}")
    return pin, bake_s


def our_stages(pipe, fast_path, size: int, steps: int, runs: int) -> dict[str, float]:
    """Each model stage's median over `runs` predictions at size x size in this process, ms, as
    pipeline.generate times them for the server's metrics (text_encode, vae_encode, denoise, vae_decode)."""
    image, mask = workload.inputs(size)
    predict = candidates.predictor(pipe, fast_path, image, mask, workload.job(1, steps))
    return median_stages([predict() for _ in range(runs)])


def run_targets(runs: int, tiny: bool, budget: float = float("inf")) -> tuple[str, dict]:
    """Every figure issue 20's targets name, in one device run: script/bake-compiled at 512x512 (64x64 on
    tiny weights); a fresh server that loads the baked parts, the checker on (cold_start_s, fresh_first_ms,
    and http_e2e_ms: the median at the client of `runs` predictions after the first, with the server's
    stage medians, http_stages_ms); then in this process diffusers' reference and the default path on the
    shipped parts at that size (reference_ms, default_ms and the compiled parts it ran on, default_compiled,
    psnr_db, and its stage medians, default_stages_ms, to set beside the server's), part 4's candidates
    (bench/candidates.py), and every automatic working shape uncompiled (shapes_ms, graphs_gib), none begun
    `budget` seconds after the start. A bake that fails, or takes over half the budget, leaves out the fresh
    server, and the rest is measured uncompiled (ours then counts as uncompiled_ms, not default_ms)."""
    from inpaint import geometry
    from inpaint import pipeline as ours
    from inpaint.fastpath import artifact

    started = time.monotonic()
    device, dtype = pick_device()
    folder = workload.weights(tiny, device)
    size, steps = (64, 3) if tiny else (512, 50)
    shapes = geometry.automatic_working_sizes()[:3] if tiny else geometry.automatic_working_sizes()
    served: dict = {}
    try:  # at most half the budget: a bake that does not end still leaves the rest of the run its time
        pin, bake_s = bake(folder, size, timeout=budget / 2 if budget < float("inf") else None)
    except RuntimeError as error:  # the rest is measured uncompiled, so that the run still ends with figures
        pin, bake_s, text = "", None, f"not measured: {error}"
        baked = f"No compiled parts: {error}. So no fresh server on them, and ours below is uncompiled"
    else:
        baked = f"script/bake-compiled at {size}x{size}: {bake_s:.0f} s. A fresh server on them (manifest pinned, checker on)"
        text = coldstart.cold_start(folder, predict=True, env={"INPAINT_COMPILED_MANIFEST_SHA256": pin}, figures=served,
                           repeats=runs, size=size, steps=steps)
    report.progress(f"fresh server with the shipped parts: {text}")
    reference = workload.load_reference(folder, device, dtype)
    fast, fast_path = workload.load_ours(folder, device, dtype, compile="background" if pin else "off", cache_dir=Path(tempfile.mkdtemp()),
                            artifact=folder / artifact.FOLDER if pin else None, artifact_pin=pin)
    row = report.section(f"{size}x{size} x1", comparison.bench_shape, reference, fast, device, size, 1, steps, runs, False) or [None] * 6
    report.progress(" | ".join(map(str, row)))
    stages = report.section("stages", our_stages, fast, fast_path, size, steps, runs) or {}
    report.progress(f"ours, each stage's median in this process, ms: {stages}")
    in_use = fast_path.in_use()
    report.progress(f"ours ran on these compiled parts: {', '.join(in_use) or 'none'}")
    tried = report.section("candidates", _candidates, folder, reference, fast, fast_path, device, dtype, size, steps, runs) or {}
    reference = fast = None
    ours.release_memory(device, fast_path)
    fast_path = None
    comparison.free_cache(device)
    rows, shapes_ms, graph_memory = comparison.every_shape(folder, device, dtype, shapes, steps, runs, report.number(row[1]) or float("nan"),
                                                 started + budget)
    report.progress(f"whole run {time.monotonic() - started:.0f} s")
    markdown = (report.heading("Issue 20's figures", tiny) + f"\n\n{steps} steps, guidance 7.5, DPMSolverMultistep, one output, median of {runs} "
              f"after a warm-up. {baked}: {text}\n\nIn this process, the default path "
              f"{'on the shipped parts' if pin else 'uncompiled'} against diffusers' reference:\n\n"
              + report.table(["shape", "reference ms", "ours ms", "ratio", "peak GiB ref / ours (ours reserved)", "agreement"], [row])
              + f"\n\nThe compiled parts ours ran on: {', '.join(in_use) or 'none'}"
              + "\n\nOurs in this process, each model stage's median, ms (the server's are above): "
              + ", ".join(f"{stage} {ms:.0f}" for stage, ms in stages.items())
              + "\n\nPart 4's candidates, each beside what runs today (bench/candidates.py):\n\n"
              + (candidates.report(tried) if tried else "not measured (the section failed; its error is above)")
              + "\n\nEvery automatic working shape, ours uncompiled:\n\n"
              + report.table(["working shape", "ours ms", "ratio to the reference"], rows)
              + f"\n\nCUDA graphs kept after them: {graph_memory[0]}")
    ours_ms = report.number(row[2])  # the default's figure only when it ran on every compiled part
    return markdown, {"reference_ms": report.number(row[1]), "default_ms": ours_ms if on_every_part(in_use) else None,
                    "uncompiled_ms": None if on_every_part(in_use) else ours_ms,
                    "default_compiled": in_use, "psnr_db": report.psnr_of(row[5]),
                    "shapes_ms": shapes_ms, "fresh_first_ms": served.get("first_ms"), "notes": fresh_notes(served) or None,
                    "fresh_first_compiled": served.get("first_compiled"), "fresh_setup_log": served.get("setup_fast_path"),
                    "http_e2e_ms": served.get("steady_ms"),
                    "http_stages_ms": served.get("steady_stages_ms"), "default_stages_ms": stages,
                    "http_gil": served.get("steady_gil"),
                    "cold_start_s": served.get("ready_s"), "graphs_gib": graph_memory[1],
                    "bake_s": round(bake_s, 1) if bake_s is not None else None,
                    "candidates": tried or None}


def on_every_part(names: list[str]) -> bool:
    """Whether the UNet and the VAE's decoder and encoder are each among these compiled parts (as the log names
    them: "UNet for latents 2x9x64x64", ...)."""
    from inpaint.fastpath import PARTS

    return all(any(name.startswith(f"{part.name} for ") for name in names) for part in PARTS.values())


def fresh_notes(served: dict) -> dict[str, str]:
    """The current table's notes for a fresh server's figures (cold_start's) when its first prediction did not
    run on every compiled part: then they are not the shipped parts' figures."""
    if served.get("first_ms") is None or on_every_part(served.get("first_compiled") or []):
        return {}
    why = ("the fresh server's first prediction ran on these compiled parts only: "
           f"{', '.join(served.get('first_compiled') or []) or 'none'} (fresh_setup_log says why)")
    return {key: why for key in ("fresh_first_ms", "http_e2e_ms", "cold_start_s")}


def _candidates(folder: Path, reference, fast, fast_path, device: torch.device, dtype: torch.dtype, size: int,
                steps: int, runs: int) -> dict:
    """bench/candidates.py's figures at size x size, with the safety checker loaded for them and freed after."""
    from inpaint.safety import SafetyChecker

    checker = SafetyChecker.load(folder, device, dtype)
    image, mask = workload.inputs(size)
    figures = candidates.measure(reference, fast, fast_path, checker, device, dtype, image, mask, workload.job(1, steps), runs)
    report.progress("candidates:\n" + candidates.report(figures))
    return figures


def run_candidates(runs: int, tiny: bool) -> tuple[str, dict]:
    """Part 4's candidates alone (bench/candidates.py), on the default fast path uncompiled: a short run."""
    started = time.monotonic()
    device, dtype = pick_device()
    folder = workload.weights(tiny, device)
    size, steps = (64, 3) if tiny else (512, 50)
    reference = workload.load_reference(folder, device, dtype)
    fast, fast_path = workload.load_ours(folder, device, dtype)
    figures = _candidates(folder, reference, fast, fast_path, device, dtype, size, steps, runs)
    report.progress(f"whole run {time.monotonic() - started:.0f} s")
    return (report.heading("Part 4's candidates", tiny) + f"\n\nAt {size}x{size}, {steps} steps; ours is the fast path uncompiled; per-call "
            f"figures are medians of 20 calls, stages medians of {runs} predictions (of one beside a busy thread):\n\n"
            + candidates.report(figures)), {"candidates": figures}


def run_shipped(tiny: bool) -> tuple[str, dict]:
    """Compiled parts shipped with the weights: script/bake-compiled at 512x512 (64x64 on tiny weights)
    into a COG_WEIGHTS folder, then a fresh server that loads them (pinned by
    INPAINT_COMPILED_MANIFEST_SHA256): its cold start, its first two predictions through HTTP at that size, and
    which compiled parts the first one ran on (the server's log)."""
    folder = workload.weights(tiny, pick_device()[0])
    size, steps = (64, 3) if tiny else (512, 50)
    try:
        pin, bake_s = bake(folder, size)
    except RuntimeError as error:
        return f"## Shipped compiled parts: {report.machine()}\n\n{error}", {}
    figures: dict = {}
    text = coldstart.cold_start(folder, predict=True, env={"INPAINT_COMPILED_MANIFEST_SHA256": pin}, figures=figures,
                                size=size, steps=steps)
    report.progress(f"fresh server with the shipped parts: {text}")
    return (f"## Shipped compiled parts: {report.machine()}\n\nscript/bake-compiled at {size}x{size}: {bake_s:.0f} s. "
            f"A fresh server with them (COG_WEIGHTS folder, manifest pinned): {text}"), {
        "bake_s": round(bake_s, 1), "cold_start_s": figures.get("ready_s"),
        "fresh_first_ms": figures.get("first_ms"), "fresh_second_ms": figures.get("second_ms"),
        "fresh_first_compiled": figures.get("first_compiled"), "fresh_setup_log": figures.get("setup_fast_path"),
        "notes": fresh_notes(figures) or None}
