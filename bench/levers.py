"""The fast path's levers, one at a time: CUDA graphs, the whole fast path, cuDNN's benchmark mode, the
sync-free loop, torch.compile as shipped (in the background, then from saved parts), and the parts in
combinations at several sizes."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

import coldstart
import report
import timeline
import workload
from timing import median_ms


def bench_levers(folder: Path, fast, fast_path, device: torch.device, dtype: torch.dtype, runs: int, steps: int,
                 tiny: bool) -> list[list[object]]:
    """Each lever alone at 512x512 x1 (64x64 on tiny weights), our prediction path, median ms.

    The default fast path against itself with CUDA graphs off and switched off entirely; cuDNN's
    benchmark mode on top (a candidate for the fast path, not in it until measured); and the
    sync-free loop, on PNDM, the scheduler whose step reads the timestep back from the GPU in plain
    diffusers (DPMSolverMultistep never does). torch.compile is measured apart (bench_compile), last.
    """
    from inpaint import pipeline as ours
    from inpaint import schedulers

    size = 64 if tiny else 512
    image, mask = workload.inputs(size)
    job = workload.job(1, steps)

    def timed(pipe, scheduler: str = "DPMSolverMultistep") -> float:
        run_job = dataclasses.replace(job, scheduler=scheduler)
        milliseconds, _ = median_ms(lambda: ours.generate(pipe, [image], [mask], run_job), device, runs)
        return milliseconds

    rows = []

    def add(row: list[object]) -> None:
        rows.append(row)
        report.progress("lever: " + " | ".join(str(cell) for cell in row))

    baseline = timed(fast)
    busy = timeline.gpu_busy(lambda: ours.generate(fast, [image], [mask], job), device)
    add(["fast path uncompiled (the default until its compiled parts are ready: CUDA graphs, channels_last UNet, "
         f"sliced VAE; {timeline.unet_replays(fast, device)}; {busy})", f"{baseline:.0f}", "1.00"])
    for label, options in (
        ("CUDA graphs off (INPAINT_CUDA_GRAPHS=0)", {"cuda_graphs": False}),
        ("fast path off (INPAINT_FAST_PATH=0): fp16 + SDPA only", {"fast": False}),
    ):
        other, other_path = workload.load_ours(folder, device, dtype, **options)
        milliseconds = timed(other)
        add([label, f"{milliseconds:.0f}", f"{milliseconds / baseline:.2f}"])
        del other, other_path
        ours.release_memory(device)
    torch.backends.cudnn.benchmark = True  # not part of the fast path yet: measured here first
    fast_path.release()  # recorded again, with the convolution algorithms cuDNN picks
    try:
        tuned = timed(fast)
    finally:
        torch.backends.cudnn.benchmark = False
        fast_path.release()
    add(["+ torch.backends.cudnn.benchmark (cuDNN times its convolution algorithms per shape)", f"{tuned:.0f}",
         f"{tuned / baseline:.2f}"])
    with_host = timed(fast, "PNDM")
    original = schedulers._INDEXED_BY_TIMESTEP
    schedulers._INDEXED_BY_TIMESTEP = ()
    try:
        read_back = timed(fast, "PNDM")
    finally:
        schedulers._INDEXED_BY_TIMESTEP = original
    add(["PNDM, timestep read back from the GPU each step (plain diffusers)", f"{read_back:.0f}", f"{read_back / baseline:.2f}"])
    add(["PNDM, host timesteps (ours: no sync in the loop)", f"{with_host:.0f}", f"{with_host / baseline:.2f}"])
    return rows


def bench_compile(folder: Path, device: torch.device, dtype: torch.dtype, runs: int, steps: int, baseline: float,
                  deadline: float) -> list[list[object]]:
    """torch.compile of the UNet and the VAE's encoder and decoder at 512x512 x1. As shipped
    (INPAINT_COMPILE=background): predictions while the worker compiles, then once they take the
    compiled parts up; then a later start on the saved compiled parts (INPAINT_COMPILE=setup: setup
    waits for the loads). Skipped when it would end after `deadline`. (Measured on 2026-11-26 and
    not timed again: torch's own mode="reduce-overhead", 400 ms; cuDNN's benchmark mode on top of the
    compiled UNet, no change; the 50 ms once seen between the first two rows, the spread of runs.)"""
    from inpaint import pipeline as ours

    image, mask = workload.inputs(512)
    job = workload.job(1, steps)
    rows: list[list[object]] = []
    empty_prompt = ours.EmptyPrompt()  # as the service holds it

    def add(label: str, milliseconds: float) -> None:
        rows.append([label, f"{milliseconds:.0f}", f"{milliseconds / baseline:.2f}"])
        report.progress("lever: " + " | ".join(rows[-1]))

    def timed(pipe, path) -> tuple[float, object, str]:
        """Median ms, the last output, and the last run's own stages (wall ms, synchronised around the VAE),
        with the cudaMalloc/cudaFree calls the timed runs made (a fragmented cache makes them costly)
        and one more run's GPU timeline (timeline.gpu_busy)."""
        stages: dict[str, float] = {}
        ours.generate(pipe, [image], [mask], job, fast=path, empty_prompt=empty_prompt)  # warm-up (the CUDA graph's recording at a new UNet)
        stats = torch.cuda.memory_stats if device.type == "cuda" else lambda _: {}
        before = stats(device)
        each: list[float] = []
        for _ in range(2 * runs):  # twice the runs: these rows decide the 400 ms target; their spread is printed
            milliseconds, painted = median_ms(lambda: ours.generate(pipe, [image], [mask], job, timings=stages, fast=path,
                                                                empty_prompt=empty_prompt), device, 1, warm_up=False)
            each.append(milliseconds)
        after = stats(device)
        calls = ", ".join(f"{key} {after.get(key, 0) - before.get(key, 0)}" for key in ("num_device_alloc", "num_device_free"))
        busy = timeline.gpu_busy(lambda: ours.generate(pipe, [image], [mask], job, fast=path), device)
        return statistics.median(each), painted, (
            f"runs {min(each):.0f}-{max(each):.0f}; last run's "
            + ", ".join(f"{name} {1000 * seconds:.0f}" for name, seconds in sorted(stages.items()))
            + f"; {calls}; {timeline.unet_replays(pipe, device)}; {busy}")

    def sources(workers) -> str:
        return ", ".join(f"{worker.part} {key} {worker.sources[key]} in {seconds:.1f} s"
                         for worker in workers for key, seconds in worker.seconds.items()) or "nothing compiled"

    cache = Path(tempfile.mkdtemp(prefix="compiled-"))  # cold: nothing saved, Inductor's cache empty
    if time.monotonic() + 180 > deadline:
        rows.append(["torch.compile in the background (the default)", "not run (time budget)", "-"])
        return rows
    try:
        begin = time.monotonic()
        pipe, path = workload.load_ours(folder, device, dtype, compile="background", cache_dir=cache)
        setup = time.monotonic() - begin
        workers = path.compiled_parts
        during, uncompiled, unet_at = [], None, None
        while not all(worker.wait(0) for worker in workers) and time.monotonic() < deadline:
            milliseconds, painted = median_ms(lambda: ours.generate(pipe, [image], [mask], job, fast=path), device, runs=1,
                                          warm_up=False)
            during.append(milliseconds)
            uncompiled = uncompiled or painted  # the first: surely before the take-up (the last may be after it)
            if unet_at is None and workers[0].wait(0):
                unet_at = time.monotonic() - begin
            time.sleep(0.05)  # as between requests: the worker checks its parts on the GPU only between predictions
        for worker in workers:
            worker.wait()
        if during:
            add(f"compile=background (the default), while the worker compiles: {len(during)} predictions "
                f"(setup {setup:.0f} s; then {sources(workers)}; the UNet ready {unet_at or 0:.0f} s after the start, "
                f"everything {time.monotonic() - begin:.0f} s)", statistics.median(during))
        milliseconds, painted, stages = timed(pipe, path)
        agreement = f"; PSNR {workload.psnr(uncompiled[0][0], painted[0][0]):.1f} dB against the first, uncompiled" if uncompiled else ""
        add(f"compile=background, once predictions take the compiled UNet and VAE up (the default from then on{agreement}; "
            f"stages, ms: {stages})", milliseconds)
        pipe = workers = None  # released (a del would leave the lambdas above naming nothing)
        path.stop()
        ours.release_memory(device, path)
        begin = time.monotonic()
        later, path = workload.load_ours(folder, device, dtype, compile="setup", cache_dir=cache)
        setup = time.monotonic() - begin
        milliseconds, _, stages = timed(later, path)
        add(f"compile=setup on a later start (saved compiled parts: {sources(path.compiled_parts)}; setup {setup:.0f} s; "
            f"stages, ms: {stages})", milliseconds)
        path.stop()
        later = path = None
    except Exception as error:  # report it and keep the rest of the run
        rows.append(["torch.compile in the background", f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}", "-"])
        report.progress("lever: " + " | ".join(rows[-1]))
    ours.release_memory(device)
    return rows


def bench_parts(folder: Path, device: torch.device, dtype: torch.dtype, runs: int, steps: int,
                sizes: tuple[int, ...]) -> list[list[object]]:
    """The fast path's parts in combinations, at each size: median ms of the prediction, and of its
    denoising loop, VAE encode and VAE decode (the last run's own stage timings)."""
    from inpaint import pipeline as ours
    from inpaint.fastpath import Graphs, UNetPart

    def build(unet_channels_last: bool, vae_channels_last: bool, fused_qkv: bool, graphs: bool):
        pipe = ours.load_pipeline(folder, device, dtype)
        if unet_channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        if vae_channels_last:
            pipe.vae.to(memory_format=torch.channels_last)
        if fused_qkv:
            pipe.fuse_qkv_projections()
        pipe.vae.enable_slicing()
        if graphs:
            pipe.unet.forward = UNetPart(pipe.unet, "unet", graphs=Graphs())
        return pipe

    rows = []
    for label, parts in (  # (UNet channels_last, VAE channels_last, fused QKV, CUDA graphs)
        ("the default (CUDA graphs, channels_last UNet)", (True, False, False, True)),
        ("+ channels_last VAE", (True, True, False, True)),
        ("+ fused QKV projections", (True, False, True, True)),
        ("UNet contiguous", (False, False, False, True)),
        ("CUDA graphs off", (True, False, False, False)),
    ):
        pipe = build(*parts)
        for size in sizes:
            image, mask = workload.inputs(size)
            job = workload.job(1, steps)
            timings: dict[str, float] = {}
            milliseconds, _ = median_ms(lambda: ours.generate(pipe, [image], [mask], job, timings=timings), device,
                                    runs if size <= 512 else 2)
            rows.append([label, f"{size}x{size}", f"{milliseconds:.0f}",
                         *(f"{1000 * timings.get(stage, float('nan')):.0f}" for stage in ("denoise", "vae_encode", "vae_decode"))])
            report.progress("part: " + " | ".join(rows[-1]))
        pipe = None
        ours.release_memory(device)
    return rows


def run_parts(runs: int, tiny: bool, budget: float) -> str:
    """--parts: which part of the fast path pays at which size, and where a cold start goes."""
    from inpaint import pipeline as ours

    started = time.monotonic()
    device, dtype = ours.pick_device()
    folder = workload.weights(tiny, device)
    sizes, steps = ((64, 128), 3) if tiny else ((512, 768, 1024), 50)
    parts = report.section("parts", bench_parts, folder, device, dtype, runs, steps, sizes) or []
    startup = [] if tiny else report.section("startup", coldstart.bench_startup, folder, started + budget) or []
    report.progress(f"whole run {time.monotonic() - started:.0f} s")
    return (f"## Fast path parts: {report.machine()}\n\nOne output, {steps} steps, DPMSolverMultistep; median ms after a warm-up "
            f"({runs} runs at 512, 2 above), with the last run's own stage timings:\n\n"
            + report.table(["parts on", "size", "prediction ms", "denoise ms", "VAE encode ms", "VAE decode ms"], parts)
            + "\n\nWhere a cold start goes (fresh processes, page cache warm):\n\n" + report.table(["what", "time"], startup))


def run_compile_only(runs: int, budget: float) -> tuple[str, dict]:
    """GPU: the default fast path uncompiled, then the compiled rows of the lever table (bench_compile)."""
    from inpaint import pipeline as ours

    started = time.monotonic()
    device, dtype = ours.pick_device()
    folder = workload.weights(False, device)
    fast, fast_path = workload.load_ours(folder, device, dtype)
    image, mask = workload.inputs(512)
    baseline, _ = median_ms(lambda: ours.generate(fast, [image], [mask], workload.job(1, 50), empty_prompt=ours.EmptyPrompt()), device, runs)
    rows = [["fast path uncompiled (the default until its compiled parts are ready)", f"{baseline:.0f}", "1.00"]]
    report.progress("lever: " + " | ".join(rows[-1]))
    fast = None
    ours.release_memory(device, fast_path)
    fast_path = None
    rows += report.section("compile", bench_compile, folder, device, dtype, runs, 50, baseline, started + budget) or []
    report.progress(f"whole run {time.monotonic() - started:.0f} s")
    return (f"## Compiled rows only: {report.machine()}\n\n512x512 x1, 50 steps, guidance 7.5, DPMSolverMultistep, our prediction "
            "path, median ms (ratio to the fast path uncompiled):\n\n" + report.table(["configuration", "ms", "ratio"], rows)), {
        "uncompiled_ms": baseline,
        "default_ms": report.by_label(rows, "compile=background, once predictions take"),
        "saved_parts_ms": report.by_label(rows, "compile=setup on a later start"),
        "during_compile_ms": report.by_label(rows, "compile=background (the default), while"),
    }
