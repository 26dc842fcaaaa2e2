"""Diffusers' reference and our prediction path on the same inputs and seed, in one run: the main table
(time, peak memory, agreement) at several shapes, every automatic working shape, and the GPU run that
gathers them with the levers, a cold start and the safety checker's cost."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image

import coldstart
import levers
import report
import timeline
import workload
from timing import median_ms
from workload import ROOT

from inpaint.fastpath.compiler import relative_error


def _peak(device: torch.device, foreign: float = 0.0) -> tuple[float, float]:
    """Peak GiB allocated (live tensors) and reserved (what the process holds, CUDA graphs' pools
    included) since the last reset, less `foreign` bytes held all along by something else."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    return (torch.cuda.max_memory_allocated() - foreign) / 2**30, (torch.cuda.max_memory_reserved() - foreign) / 2**30


def _reset_peak(device: torch.device) -> float:
    """Reset the peak counters; returns the bytes allocated now."""
    if device.type != "cuda":
        return 0.0
    torch.cuda.reset_peak_memory_stats()
    return float(torch.cuda.memory_allocated())


def free_cache(device: torch.device) -> None:
    """Hand back cached blocks nothing uses (the CUDA graphs and their memory stay)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _weight_bytes(pipe) -> float:
    modules = (pipe.unet, pipe.vae, pipe.text_encoder)
    return float(sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()]))


def _latent_error(reference, fast, image, mask, job) -> float:
    """Relative error of our final latents against the reference's, same inputs and seed."""
    from diffusers import StableDiffusionInpaintPipeline

    from inpaint.schedulers import make_scheduler

    latents = []
    for pipe in (reference, fast):
        run = StableDiffusionInpaintPipeline(
            **{**pipe.components, "scheduler": make_scheduler(job.scheduler, pipe.scheduler.config)},
            requires_safety_checker=False,
        )
        run.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            latents.append(run(
                prompt=job.prompt, image=image, mask_image=mask, height=image.height, width=image.width,
                num_inference_steps=job.num_inference_steps, guidance_scale=job.guidance_scale,
                num_images_per_prompt=job.num_outputs, generator=torch.Generator("cpu").manual_seed(job.seed),
                output_type="latent",
            ).images.float())
    return relative_error(latents[1], latents[0])


def bench_shape(reference, fast, device, size: int, count: int, steps: int, runs: int, compare_latents: bool) -> list[object]:
    """One row of the main table: reference and ours on the same inputs and seed."""
    from inpaint import pipeline as ours

    image, mask = workload.inputs(size)
    job = workload.job(count, steps)

    def run_reference():
        return reference(
            prompt=job.prompt, image=image, mask_image=mask, height=size, width=size,
            num_inference_steps=steps, guidance_scale=7.5, num_images_per_prompt=count,
            generator=torch.Generator("cpu").manual_seed(42),
        ).images

    empty_prompt = ours.EmptyPrompt()  # as the service holds it

    def run_ours():
        return ours.generate(fast, [image], [mask], job, empty_prompt=empty_prompt)[0]

    # Both pipelines sit on the GPU at once: each one's peak leaves out what only the other holds.
    reference_weights = _weight_bytes(reference)
    before = _reset_peak(device)
    reference_ms, reference_images = median_ms(run_reference, device, runs)
    reference_peak, _ = _peak(device, foreign=before - reference_weights)
    free_cache(device)  # ours starts from what the process would hold between its own predictions
    _reset_peak(device)
    ours_ms, our_images = median_ms(run_ours, device, runs)
    ours_peak, ours_reserved = _peak(device, foreign=reference_weights)
    psnr = min(workload.psnr(a, b) for a, b in zip(reference_images, our_images))
    agreement = f"PSNR {psnr:.1f} dB"
    if compare_latents:
        agreement += f", latents rel. err {_latent_error(reference, fast, image, mask, job):.1e}"
    return [f"{size}x{size} x{count}", f"{reference_ms:.0f}", f"{ours_ms:.0f}", f"{reference_ms / ours_ms:.2f}",
            f"{reference_peak:.2f} / {ours_peak:.2f} ({ours_reserved:.2f})", agreement]


def bench_memory_only(fast, device, size: int, count: int, steps: int) -> list[object]:
    """Ours alone, one run without warm-up: the peak memory of the largest batch (the 16 GB target)."""
    from inpaint import pipeline as ours

    image, mask = workload.inputs(size)
    job = workload.job(count, steps)
    free_cache(device)  # the CUDA graphs recorded so far stay, as they would in a running server
    _reset_peak(device)
    milliseconds, _ = median_ms(lambda: ours.generate(fast, [image], [mask], job), device, runs=1, warm_up=False)
    peak, reserved = _peak(device)
    return [f"{size}x{size} x{count} (ours only, one run, no warm-up)", "-", f"{milliseconds:.0f}", "-",
            f"- / {peak:.2f} ({reserved:.2f})", "-"]


def _safety_on(folder: Path, device: torch.device, dtype: torch.dtype, runs: int) -> str:
    """Added time per output of the safety checker on this device, for 1 and 4 outputs."""
    from inpaint.safety import SafetyChecker

    checker = SafetyChecker.load(folder, device, dtype)
    crop = Image.open(ROOT / "examples" / "chelsea.png").convert("RGB").resize((512, 512))
    figures = []
    for count in (1, 4):
        milliseconds, _ = median_ms(lambda: checker.flags([crop] * count), device, runs)
        figures.append(f"{milliseconds:.1f} ms for {count} output(s) ({milliseconds / count:.1f} ms each)")
    return "; ".join(figures)


def run_gpu(runs: int, tiny: bool, quick: bool = False, budget: float = 480.0) -> tuple[str, dict]:
    """The GPU comparison; `budget` seconds from the start bound the optional compile levers."""
    from inpaint import pipeline as ours

    started = time.monotonic()
    device, dtype = ours.pick_device()
    folder = workload.weights(tiny, device)
    if tiny:
        shapes, memory_shape, steps = [(64, 1, runs), (128, 2, 2)], (128, 4), 3
    else:
        report.progress(f"full-size weights ready after {time.monotonic() - started:.0f} s")
        # (size, outputs, timed runs): the larger shapes get fewer runs, to keep the whole run near 6 minutes
        shapes, memory_shape, steps = [(512, 1, runs), (768, 1, 3), (1024, 1, 2), (512, 4, 2)], (1024, 4), 50
        if quick:
            shapes, memory_shape = shapes[:1], None
    reference = workload.load_reference(folder, device, dtype)
    begin = time.monotonic()
    fast, fast_path = workload.load_ours(folder, device, dtype)
    report.progress(f"our pipeline loaded and warmed up in {time.monotonic() - begin:.1f} s")
    rows = []
    for index, (size, count, shape_runs) in enumerate(shapes):
        row = report.section(f"{size}x{size} x{count}", bench_shape, reference, fast, device, size, count, steps, shape_runs, index == 0)
        if row:
            rows.append(row)
            report.progress(" | ".join(rows[-1]))
    graph_memory = timeline.graph_memory(fast_path)
    report.progress(f"CUDA graphs after the shapes: {graph_memory[0]}")
    reference = None
    free_cache(device)
    if memory_shape:
        row = report.section("memory", bench_memory_only, fast, device, *memory_shape, steps)
        if row:
            rows.append(row)
            report.progress(" | ".join(rows[-1]))
    lever_rows = report.section("levers", levers.bench_levers, folder, fast, fast_path, device, dtype, runs, steps, tiny) or []
    baseline = float(lever_rows[0][1]) if lever_rows else float("nan")
    fast = None
    ours.release_memory(device, fast_path)
    fast_path = None
    cold = "not measured on tiny weights" if tiny else coldstart.cold_start(folder, predict=True)
    report.progress(f"cold start: {cold}")
    safety = report.section("safety", _safety_on, folder, device, dtype, runs)
    report.progress(f"safety checker: {safety}; {time.monotonic() - started:.0f} s so far")
    if tiny or device.type != "cuda":
        lever_rows.append(["+ torch.compile(unet)", "not run (" + ("tiny weights" if tiny else "no CUDA") + ")", "-"])
    else:
        lever_rows += report.section("compile", levers.bench_compile, folder, device, dtype, runs, steps, baseline, started + budget) or []
    report.progress(f"whole run {time.monotonic() - started:.0f} s")
    first = rows[0] if rows else [None] * 6
    figures = {
        "reference_ms": report.number(first[1]),
        "uncompiled_ms": report.number(first[2]),
        "psnr_db": report.psnr_of(first[5]),
        "shapes_ms": {row[0]: report.number(row[2]) for row in rows[1:] if report.number(row[2]) is not None},
        "default_ms": report.by_label(lever_rows, "compile=background, once predictions take"),
        "saved_parts_ms": report.by_label(lever_rows, "compile=setup on a later start"),
        "during_compile_ms": report.by_label(lever_rows, "compile=background (the default), while"),
        "cold_start_s": report.number(cold) if not tiny else None,
        "safety_ms": report.number(safety),
        "graphs_gib": graph_memory[1],
    }
    markdown = (report.heading("GPU run", tiny) + f"\n\n{steps} steps, guidance 7.5, DPMSolverMultistep, median after a warm-up; "
            "ours is the fast path uncompiled (as before its compiled UNet is ready; compiled: the lever table):\n\n") + report.table(
        ["shape", "reference ms", "ours ms", "ratio", "peak GiB ref / ours (ours reserved)", "agreement"], rows
    ) + (f"\n\nCUDA graphs kept after those shapes: {graph_memory[0]}"
         f"\n\nCold start, process start to READY through Cog's server, weights on local disk: {cold}"
         f"\n\nSafety checker added time: {safety}"
         f"\n\nLevers one at a time, {'64x64' if tiny else '512x512'} x1, {steps} steps, our prediction path, "
         f"median ms (ratio to the default fast path; under 1 is faster):\n\n"
         + report.table(["configuration", "ms", "ratio"], lever_rows))
    return markdown, figures


def every_shape(folder: Path, device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int]], steps: int,
                 runs: int, reference_ms: float,
                 deadline: float = float("inf")) -> tuple[list[list[str]], dict[str, float], tuple[str, float | None]]:
    """Ours uncompiled at each shape, steady state (one warm-up each records its CUDA graph), no shape
    begun after `deadline` (time.monotonic()): the table's rows, shapes_ms, and the CUDA graphs' memory
    after them. A shape not measured has a row that says so, and no entry in shapes_ms."""
    from inpaint import pipeline as ours

    fast, fast_path = workload.load_ours(folder, device, dtype)
    empty_prompt = ours.EmptyPrompt()  # as the service holds it
    rows, shapes_ms = [], {}
    for index, (width, height) in enumerate(shapes):
        if time.monotonic() >= deadline:  # the run's figures are written only at its end: end it in time
            rows += [[f"{w}x{h}", "not measured: the run's --budget was spent", ""] for w, h in shapes[index:]]
            report.progress(f"budget spent: {len(shapes) - index} of {len(shapes)} shapes not measured")
            break
        image, mask = workload.inputs(width, height)
        milliseconds, _ = median_ms(lambda: ours.generate(fast, [image], [mask], workload.job(1, steps), empty_prompt=empty_prompt),
                                device, runs)
        shapes_ms[f"{width}x{height}"] = round(milliseconds, 1)
        rows.append([f"{width}x{height}", f"{milliseconds:.0f}", f"{milliseconds / reference_ms:.2f}"])
        report.progress(" | ".join(rows[-1]))
    graph_memory = timeline.graph_memory(fast_path)
    ours.release_memory(device, fast_path)
    return rows, shapes_ms, graph_memory


def run_every_shape(runs: int, tiny: bool, budget: float = float("inf")) -> tuple[str, dict]:
    """Every automatic working shape (geometry.automatic_working_sizes; the first three on tiny weights),
    ours at steady state after one warm-up each (which records that shape's CUDA graph), beside diffusers'
    reference at 512x512 timed in the same run; then the memory the CUDA graphs hold. Ours is the fast
    path uncompiled: a fresh container's speed at each shape until its compiled parts are taken up."""
    from inpaint import geometry
    from inpaint import pipeline as ours

    started = time.monotonic()
    device, dtype = ours.pick_device()
    folder = workload.weights(tiny, device)
    shapes, steps = (geometry.automatic_working_sizes()[:3], 3) if tiny else (geometry.automatic_working_sizes(), 50)
    reference = workload.load_reference(folder, device, dtype)
    image, mask = workload.inputs(512)
    reference_ms, _ = median_ms(lambda: reference(
        prompt=workload.job(1, steps).prompt, image=image, mask_image=mask, height=512, width=512, num_inference_steps=steps,
        guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(42)).images, device, runs)
    report.progress(f"reference 512x512 x1: {reference_ms:.0f} ms")
    reference = None
    free_cache(device)
    rows, shapes_ms, graph_memory = every_shape(folder, device, dtype, shapes, steps, runs, reference_ms, started + budget)
    report.progress(f"whole run {time.monotonic() - started:.0f} s")
    markdown = (report.heading("Every automatic working shape", tiny) + f"\n\n{steps} steps, guidance 7.5, DPMSolverMultistep, one output, median of {runs} "
              f"after a warm-up; ours is the fast path uncompiled. diffusers' reference at 512x512 in the same run: "
              f"{reference_ms:.0f} ms.\n\n" + report.table(["working shape", "ours ms", "ratio to the reference"], rows)
              + f"\n\nCUDA graphs kept after them: {graph_memory[0]}")
    return markdown, {"reference_ms": round(reference_ms, 1), "shapes_ms": shapes_ms, "graphs_gib": graph_memory[1]}
