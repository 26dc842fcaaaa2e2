#!/usr/bin/env python
"""Speed, load-time and memory measurements: bench/bench.py [--cpu] [--tiny] [--runs N]

On a GPU (default when CUDA is present): builds full-size random weights from the real configs,
then times diffusers' StableDiffusionInpaintPipeline (fp16, SDPA, eager) and this project's
prediction path on the same inputs in one run (warm-up, then the median of --runs runs, CUDA
events), checks that the outputs agree, and prints one table: shape, reference ms, ours ms,
ratio, peak memory, agreement.

With --cpu: what needs no GPU: load time of the full-size weights (ours vs from_pretrained), the
pre/post-processing time of a 4096x4096 input (decode, mask work, composite, encode), and the
safety checker's added time per output.

--tiny runs the GPU comparison's code on the tiny test weights (on whatever device is present):
a smoke test of this script, not a measurement.

Results are appended to bench/RESULTS.md with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from fullsize import build_full_size, size_report  # noqa: E402

CACHE = ROOT / ".cache"
RESULTS = ROOT / "bench" / "RESULTS.md"


def machine() -> str:
    import diffusers
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{datetime.date.today().isoformat()}; {gpu}; CPU {cpu} x{os.cpu_count()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    )


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- CPU measurements


def _load_in_subprocess(code: str) -> float:
    """Seconds a fresh interpreter spends in the timed load, the files already in the page cache."""
    script = f"""
import sys, time, json, logging
sys.path.insert(0, {str(ROOT)!r})
logging.disable(logging.WARNING)
import torch, diffusers
from diffusers.utils import logging as dl
dl.set_verbosity_error(); dl.disable_progress_bar()
{code}
print(json.dumps(elapsed))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def bench_load(folder: Path, runs: int) -> list[list[object]]:
    for path in folder.rglob("*.safetensors"):  # warm the page cache: measure loading, not the disk
        with open(path, "rb") as file:
            while file.read(64 << 20):
                pass
    ours = f"""
from inpaint.config import Settings
from inpaint.service import Inpainter
start = time.perf_counter()
Inpainter.load({str(folder)!r}, Settings(device="cpu"))
elapsed = time.perf_counter() - start
"""
    ours_no_checker = ours.replace('Settings(device="cpu")', 'Settings(device="cpu", safety_checker=False)')
    reference = f"""
from diffusers import StableDiffusionInpaintPipeline
start = time.perf_counter()
StableDiffusionInpaintPipeline.from_pretrained({str(folder)!r}, variant="fp16", dtype=torch.float32, safety_checker=None)
elapsed = time.perf_counter() - start
"""
    (folder / ".verified.json").unlink(missing_ok=True)
    first = _load_in_subprocess(ours)  # includes the sha256 check of every file
    rows = [["ours, first start (sha256 of every file, then load; checker included)", f"{first:.2f}"]]
    ours_times = [_load_in_subprocess(ours) for _ in range(runs)]
    no_checker_times = [_load_in_subprocess(ours_no_checker) for _ in range(runs)]
    reference_times = [_load_in_subprocess(reference) for _ in range(runs)]
    rows.append(["ours, later starts (verified stamp; checker included)", f"{statistics.median(ours_times):.2f}"])
    rows.append(["ours, later starts, checker off (the same work as the next line)", f"{statistics.median(no_checker_times):.2f}"])
    rows.append(["diffusers from_pretrained (no checker, no verification)", f"{statistics.median(reference_times):.2f}"])
    return rows


def _photo_4096(path: Path) -> Path:
    """A realistic 4096x4096 photo: the example, upscaled (compresses like a photo, not like noise)."""
    if not path.is_file():
        Image.open(ROOT / "examples" / "chelsea.png").convert("RGB").resize((4096, 4096), Image.Resampling.LANCZOS).save(
            path, compress_level=6
        )
    return path


def bench_prepost(runs: int) -> list[list[object]]:
    """The service's own stage timings for a 4096x4096 photo, end to end through Inpainter.inpaint.

    The model runs too, but it is the tiny test model at 64x64, and its stages (vae_encode, denoise,
    vae_decode, safety) are left out of the figures: what remains is decode, mask work and crops
    (prepare), composite and encode, exactly as a real prediction runs them.
    """
    from inpaint.config import Settings
    from inpaint.inputs import check_inputs
    from inpaint.service import Inpainter

    CACHE.mkdir(exist_ok=True)
    tiny = CACHE / "tiny-weights"
    if not (tiny / "model_index.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "script" / "make-tiny-weights"), str(tiny)], check=True)
    inpainter = Inpainter.load(str(tiny), Settings(device="cpu"))
    png = _photo_4096(CACHE / "photo-4096.png")
    jpeg = CACHE / "photo-4096.jpg"
    if not jpeg.is_file():
        Image.open(png).save(jpeg, quality=92)
    small, large = CACHE / "mask-4096.png", CACHE / "mask-4096-large.png"
    for path, draw in ((small, "ellipse"), (large, "rectangle")):
        mask = Image.new("L", (4096, 4096), 0)
        box = (1500, 1200, 2300, 1800) if path == small else (300, 300, 3800, 3800)
        getattr(ImageDraw.Draw(mask), draw)(box, fill=255)
        mask.save(path)
    stages = ("decode", "prepare", "composite", "encode")
    rows = []
    for label, photo, mask_path in (
        ("PNG in, PNG out, 800x600 mask", png, small),
        ("JPEG in, PNG out, 800x600 mask", jpeg, small),
        ("JPEG in, PNG out, 3500x3500 mask (the whole photo is the crop)", jpeg, large),
    ):
        timings: dict[str, list[float]] = {stage: [] for stage in stages}
        for _ in range(runs):
            out = Path(tempfile.mkdtemp())
            request = check_inputs(seed=1, num_inference_steps=1, width=64, height=64, disable_safety_checker=True)
            result = inpainter.inpaint(photo, mask_path, request, out)
            for stage in stages:
                timings[stage].append(result.metrics["timings"][stage])
        medians = [1000 * statistics.median(timings[stage]) for stage in stages]
        rows.append([label, *(f"{value:.0f}" for value in medians), f"{sum(medians):.0f}"])
    return rows


def bench_safety(folder: Path, runs: int) -> list[list[object]]:
    from inpaint.safety import SafetyChecker

    checker = SafetyChecker.load(folder, torch.device("cpu"), torch.float32)
    crop = Image.open(ROOT / "examples" / "chelsea.png").convert("RGB").resize((512, 512))
    rows = []
    for count in (1, 4):
        images = [crop] * count
        checker.flags(images)  # warm-up
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            checker.flags(images)
            times.append(time.perf_counter() - start)
        rows.append([f"{count} output(s)", f"{1000 * statistics.median(times):.0f}", f"{1000 * statistics.median(times) / count:.0f}"])
    return rows


def run_prepost_only(runs: int) -> str:
    return f"## Pre/post only: {machine()}\n\n" + table(
        ["input", "decode", "prepare", "composite", "encode", "total"], bench_prepost(runs)
    )


def run_cpu(runs: int) -> str:
    torch.set_num_threads(os.cpu_count() or 1)
    folder = build_full_size(CACHE / "full-size-weights")
    sections = [f"## CPU run: {machine()}"]
    sections.append("Full-size random weights (fp16 safetensors) against the published sizes:\n\n" + table(
        ["file", "bytes", "published", "same"],
        [[name, f"{ours:,}", f"{published:,}" if published else "-", ours == published] for name, ours, published in size_report(folder)],
    ))
    sections.append(f"Load time to a ready model on the CPU (fp32), seconds, median of {runs} fresh processes:\n\n"
                    + table(["loader", "seconds"], bench_load(folder, runs)))
    sections.append(f"Pre/post-processing of a 4096x4096 photo (Inpainter.inpaint's own stage "
                    f"timings, model stages left out), ms, median of {runs}:\n\n"
                    + table(["input", "decode", "prepare", "composite", "encode", "total"], bench_prepost(runs)))
    sections.append(f"Safety checker (full-size ViT-L/14, fp32 on the CPU), ms, median of {runs}:\n\n"
                    + table(["batch", "ms", "ms per output"], bench_safety(folder, runs)))
    sections.append("Cold start on the CPU, process start to READY through Cog's server (full-size weights, fp32, "
                    f"page cache warm): {_cold_start(folder)}")
    return "\n\n".join(sections)


# ---------------------------------------------------------------- GPU comparison


def _inputs(size: int):
    image = Image.open(ROOT / "examples" / "chelsea.png").convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse((size // 5, size // 6, size * 4 // 5, size * 2 // 3), fill=255)
    return image, mask


def _time(function, device: torch.device, runs: int) -> tuple[float, object]:
    function()  # warm-up (and compile, where the fast path compiles)
    times, value = [], None
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            value = function()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            value = function()
            times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times), value


def _psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = np.mean((x - y) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


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
    return float((latents[0] - latents[1]).norm() / latents[0].norm())


def _safety_on(folder: Path, device: torch.device, dtype: torch.dtype, runs: int) -> str:
    """Added time per output of the safety checker on this device, for 1 and 4 outputs."""
    from inpaint.safety import SafetyChecker

    checker = SafetyChecker.load(folder, device, dtype)
    crop = Image.open(ROOT / "examples" / "chelsea.png").convert("RGB").resize((512, 512))
    figures = []
    for count in (1, 4):
        milliseconds, _ = _time(lambda: checker.flags([crop] * count), device, runs)
        figures.append(f"{milliseconds:.1f} ms for {count} output(s) ({milliseconds / count:.1f} ms each)")
    return "; ".join(figures)


def _cold_start(folder: Path) -> str:
    """Seconds from starting Cog's server to READY (needs cog installed), with the sha256 stamp in place."""
    try:
        sys.path.insert(0, str(ROOT / "script"))
        from cogserver import CogServer
    except ImportError:
        return "not measured (cog is not installed)"
    log = Path(tempfile.mkdtemp()) / "server.log"
    started = time.monotonic()
    server = CogServer(folder, log_path=log, env={"INPAINT_SAFETY_CHECKER": "1"})
    try:
        server.start(timeout=300)
        return f"{time.monotonic() - started:.1f} s (safety checker included)"
    except Exception as error:  # report, do not lose the rest of the table
        return f"failed: {error}"
    finally:
        server.stop()


def bench_levers(folder: Path, fast, device: torch.device, dtype: torch.dtype, runs: int, steps: int, tiny: bool,
                 deadline: float) -> list[list[object]]:
    """Each lever alone at 512x512 x1 (64x64 on tiny weights), our prediction path, median ms.

    The fast path against itself switched off; torch.compile of the UNet on top (the first call,
    which compiles, is reported apart); and the sync-free loop, on PNDM, the scheduler whose step
    reads the timestep back from the GPU in plain diffusers (DPMSolverMultistep never does).
    Compile levers are skipped on tiny weights and once `deadline` (time.monotonic) has passed.
    """
    from inpaint import pipeline as ours
    from inpaint import schedulers

    size = 64 if tiny else 512
    image, mask = _inputs(size)
    job = ours.Generation("a cat wearing round sunglasses, photo", None, 1, steps, 7.5, 1.0, "DPMSolverMultistep", 42)

    def timed(pipe, scheduler: str = "DPMSolverMultistep") -> float:
        run_job = dataclasses.replace(job, scheduler=scheduler)
        milliseconds, _ = _time(lambda: ours.generate(pipe, [image], [mask], run_job), device, runs)
        return milliseconds

    rows = []

    def add(row: list[object]) -> None:
        rows.append(row)
        _progress("lever: " + " | ".join(str(cell) for cell in row))

    baseline = timed(fast)
    add(["fast path (the default: channels_last, fused QKV, sliced VAE)", f"{baseline:.0f}", "1.00"])
    plain = ours.load_pipeline(folder, device, dtype, fast=False)
    unoptimized = timed(plain)
    add(["fast path off (INPAINT_FAST_PATH=0): fp16 + SDPA only", f"{unoptimized:.0f}", f"{unoptimized / baseline:.2f}"])
    del plain
    with_host = timed(fast, "PNDM")
    original = schedulers._INDEXED_BY_TIMESTEP
    schedulers._INDEXED_BY_TIMESTEP = ()
    try:
        read_back = timed(fast, "PNDM")
    finally:
        schedulers._INDEXED_BY_TIMESTEP = original
    add(["PNDM, timestep read back from the GPU each step (plain diffusers)", f"{read_back:.0f}", f"{read_back / baseline:.2f}"])
    add(["PNDM, host timesteps (ours: no sync in the loop)", f"{with_host:.0f}", f"{with_host / baseline:.2f}"])
    for mode in ("default", "reduce-overhead"):
        label = f"+ torch.compile(unet, mode={mode})" + (" (CUDA graphs)" if mode == "reduce-overhead" else "")
        if tiny or device.type != "cuda" or time.monotonic() > deadline:
            add([label, "not run (" + ("tiny weights" if tiny else "no CUDA" if device.type != "cuda" else "time budget") + ")", "-"])
            continue
        compiled = ours.load_pipeline(folder, device, dtype)
        compiled.unet = torch.compile(compiled.unet, mode=None if mode == "default" else mode, fullgraph=True, dynamic=False)
        try:
            begin = time.perf_counter()
            ours.generate(compiled, [image], [mask], job)
            torch.cuda.synchronize()
            first = time.perf_counter() - begin
            milliseconds = timed(compiled)
            add([f"{label}; first call {first:.0f} s", f"{milliseconds:.0f}", f"{milliseconds / baseline:.2f}"])
        except Exception as error:  # report it and keep the rest of the run
            add([label, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}", "-"])
        del compiled
        torch._dynamo.reset()
    ours.release_memory(device)
    return rows


def _progress(text: str) -> None:
    """A line on stderr as soon as a figure exists, so a run cut short still leaves what it measured."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_gpu(runs: int, tiny: bool, quick: bool = False) -> str:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionInpaintPipeline

    from inpaint import pipeline as ours

    started = time.monotonic()
    device, dtype = ours.pick_device()
    if tiny:
        folder = CACHE / "tiny-weights"
        if not (folder / "model_index.json").is_file():
            subprocess.run([sys.executable, str(ROOT / "script" / "make-tiny-weights"), str(folder)], check=True)
        shapes, steps = [(64, 1), (128, 2)], 3
    else:
        folder = build_full_size(CACHE / "full-size-weights")
        _progress(f"full-size weights ready after {time.monotonic() - started:.0f} s")
        shapes, steps = [(512, 1), (768, 1), (1024, 1), (512, 4), (1024, 4)], 50
        if quick:
            shapes = shapes[:1]
    reference = StableDiffusionInpaintPipeline.from_pretrained(
        folder, variant="fp16", dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    reference.scheduler = DPMSolverMultistepScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    fast = ours.load_pipeline(folder, device, dtype)
    rows = []
    for size, count in shapes:
        image, mask = _inputs(size)
        job = ours.Generation("a cat wearing round sunglasses, photo", None, count, steps, 7.5, 1.0, "DPMSolverMultistep", 42)

        def run_reference():
            return reference(
                prompt=job.prompt, image=image, mask_image=mask, height=size, width=size,
                num_inference_steps=steps, guidance_scale=7.5, num_images_per_prompt=count,
                generator=torch.Generator("cpu").manual_seed(42),
            ).images

        def run_ours():
            return ours.generate(fast, [image], [mask], job)[0]

        shape_runs = runs if size * size * count <= 1024 * 1024 else max(2, runs // 2)  # keep the run under 6 min
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        reference_ms, reference_images = _time(run_reference, device, shape_runs)
        reference_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ours_ms, our_images = _time(run_ours, device, shape_runs)
        ours_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        psnr = min(_psnr(a, b) for a, b in zip(reference_images, our_images))
        agreement = f"PSNR {psnr:.1f} dB"
        if not rows:  # the first shape also compares the final latents
            agreement += f", latents rel. err {_latent_error(reference, fast, image, mask, job):.1e}"
        rows.append([f"{size}x{size} x{count}", f"{reference_ms:.0f}", f"{ours_ms:.0f}", f"{reference_ms / ours_ms:.2f}",
                     f"{reference_peak:.2f} / {ours_peak:.2f}", agreement])
        _progress(" | ".join(rows[-1]))
    levers = bench_levers(folder, fast, device, dtype, runs, steps, tiny, deadline=started + 270)
    del reference
    ours.release_memory(device)
    cold = _cold_start(folder) if not tiny else "not measured on tiny weights"
    _progress(f"cold start: {cold}")
    safety = _safety_on(folder, device, dtype, runs)
    _progress(f"safety checker: {safety}; whole run {time.monotonic() - started:.0f} s")
    title = "Smoke test on tiny weights (not a measurement)" if tiny else "GPU run"
    return f"## {title}: {machine()}\n\n{steps} steps, guidance 7.5, DPMSolverMultistep, median of {runs} after a warm-up:\n\n" + table(
        ["shape", "reference ms", "ours ms", "ratio", "peak GiB (ref / ours)", "agreement"], rows
    ) + (f"\n\nCold start, process start to READY through Cog's server, weights on local disk: {cold}"
         f"\n\nSafety checker added time: {safety}"
         f"\n\nLevers one at a time, {'64x64' if tiny else '512x512'} x1, {steps} steps, our prediction path, "
         f"median ms (ratio to the default fast path; under 1 is faster):\n\n"
         + table(["configuration", "ms", "ratio"], levers))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU measurements (load time, pre/post, safety)")
    parser.add_argument("--prepost", action="store_true", help="only the 4096x4096 pre/post-processing timings (CPU)")
    parser.add_argument("--quick", action="store_true", help="GPU: only 512x512 x1 in the main table (a shorter rerun)")
    parser.add_argument("--tiny", action="store_true", help="smoke-test the GPU comparison on tiny weights")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    if args.prepost:
        report = run_prepost_only(args.runs)
    elif args.cpu:
        report = run_cpu(args.runs)
    elif torch.cuda.is_available() or args.tiny:
        report = run_gpu(args.runs, args.tiny, args.quick)
    else:
        print("no CUDA GPU here: run with --cpu for the CPU measurements (or --tiny for a smoke test)", file=sys.stderr)
        return 2
    print(report)
    if not args.no_record and not args.tiny:
        with open(RESULTS, "a") as file:
            file.write("\n\n" + report + "\n")
        print(f"\nappended to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
