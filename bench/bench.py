#!/usr/bin/env python
"""Speed, load-time and memory measurements: bench/bench.py [--cpu | --parts | --compile-only | --cold-start | --prepost] [--tiny]

On a GPU (default when CUDA is present): builds full-size random weights from the real configs,
then times diffusers' StableDiffusionInpaintPipeline (fp16, SDPA, eager) and this project's
prediction path on the same inputs in one run (warm-up, then the median of --runs runs, CUDA
events), checks that the outputs agree, and prints one table: shape, reference ms, ours ms,
ratio, peak memory, agreement; then the cold start and first predictions through Cog's server,
the safety checker's cost, each lever alone, and torch.compile last (within --budget seconds).

With --parts (GPU): the fast path's parts in combinations at 512/768/1024, and where a cold start
goes (import times, server starts, compile with a cold cache).

With --cold-start: process start to READY through Cog's server, for a first start (sha256 of every
file) and later starts with the page cache cold and warm (CPU or GPU).

With --cpu: what needs no GPU: load time of the full-size weights (ours vs from_pretrained), the
pre/post-processing time of a 4096x4096 input (decode, mask work, composite, encode), and the
safety checker's added time per output.

--tiny runs the GPU comparison's code on the tiny test weights (on whatever device is present):
a smoke test of this script, not a measurement.

Each run appends its report to bench/RESULTS.md (History), writes its figures to
bench/results/<date>-<time>-<machine>-<mode>.json, and remakes the current table at the top of
RESULTS.md from every run's figures (bench/results_table.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from fullsize import build_full_size, size_report  # noqa: E402
import candidates  # noqa: E402
import gil  # noqa: E402
from timing import median_ms, median_stages  # noqa: E402

from inpaint.fastpath.compiler import relative_error  # noqa: E402
from inpaint.weights import cache_root, manifest_pin  # noqa: E402


def forget_verification() -> None:
    """The next start hashes every file again, as a first start does."""
    shutil.rmtree(cache_root() / "verified", ignore_errors=True)

CACHE = ROOT / ".cache"
RESULTS = ROOT / "bench" / "RESULTS.md"


def _cpu_name() -> str:
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    import diffusers
    import transformers

    cpu = _cpu_name()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{datetime.date.today().isoformat()}; {gpu}; CPU {cpu} x{os.cpu_count()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    )


def _number(text: object) -> float | None:
    """The first number in a table cell ("613", "58.8 dB", "13.7 s (safety ...)"); None if there is none."""
    match = re.search(r"-?\d+(?:\.\d+)?", str(text))
    return float(match.group()) if match else None


def _psnr_of(cell: object) -> float | None:
    """The PSNR of an agreement cell ("PSNR 58.8 dB, latents ...", "PSNR inf dB" when equal)."""
    match = re.search(r"PSNR (inf|\d+(?:\.\d+)?) dB", str(cell))
    return float(match.group(1)) if match else None


def _by_label(rows: list[list[object]], start: str) -> float | None:
    """The number in the second column of the first row whose label starts with `start`."""
    return next((_number(row[1]) for row in rows if str(row[0]).startswith(start)), None)


def machine_facts() -> dict[str, object]:
    """What bench/results/*.json records of the machine a run measured on."""
    import diffusers

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": f"{_cpu_name()} x{os.cpu_count()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def record(report: str, figures: dict[str, object], mode: str) -> None:
    """Append the report to RESULTS.md's history, write the run's figures to bench/results/, and remake
    the current table at the top of RESULTS.md from every run's figures."""
    import results_table

    with open(RESULTS, "a") as file:
        file.write("\n\n" + report + "\n")
    print(f"\nappended to {RESULTS.relative_to(ROOT)}")
    figures = {key: value for key, value in figures.items() if value is not None and value != {}}
    if not figures:
        return
    facts = machine_facts()
    kind = re.sub(r"[^a-z0-9]+", "-", (facts["gpu"] or "cpu").lower()).strip("-")
    path = results_table.RESULTS_DIR / f"{facts['date']}-{time.strftime('%H%M')}-{kind}-{mode}.json"
    path.parent.mkdir(exist_ok=True)
    heading = report.splitlines()[0].lstrip("# ")
    path.write_text(json.dumps({"machine": facts, "source": f"bench/RESULTS.md, History: \"{heading}\"", **figures},
                               indent=2) + "\n")
    results_table.update()
    print(f"wrote {path.relative_to(ROOT)}; the current table of {RESULTS.relative_to(ROOT)} remade")


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
Inpainter.load({str(folder)!r}, Settings(device="cpu", weights_manifest_sha256={manifest_pin(folder)!r}))
elapsed = time.perf_counter() - start
"""
    ours_no_checker = ours.replace('Settings(device="cpu"', 'Settings(device="cpu", safety_checker=False')
    reference = f"""
from diffusers import StableDiffusionInpaintPipeline
start = time.perf_counter()
StableDiffusionInpaintPipeline.from_pretrained({str(folder)!r}, variant="fp16", dtype=torch.float32, safety_checker=None)
elapsed = time.perf_counter() - start
"""
    forget_verification()
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


def _prepost_files() -> tuple[Path, Path, Path, Path, Path]:
    """The 4096x4096 photo (PNG and JPEG) and masks (800x600 ellipse, 3500x3500, brush strokes) of the pre/post rows."""
    CACHE.mkdir(exist_ok=True)
    png = _photo_4096(CACHE / "photo-4096.png")
    jpeg = CACHE / "photo-4096.jpg"
    if not jpeg.is_file():
        Image.open(png).save(jpeg, quality=92)
    small, large, strokes = CACHE / "mask-4096.png", CACHE / "mask-4096-large.png", CACHE / "mask-4096-strokes.png"
    for path, draw in ((small, "ellipse"), (large, "rectangle")):
        mask = Image.new("L", (4096, 4096), 0)
        box = (1500, 1200, 2300, 1800) if path == small else (300, 300, 3800, 3800)
        getattr(ImageDraw.Draw(mask), draw)(box, fill=255)
        mask.save(path)
    mask = Image.new("L", (4096, 4096), 0)  # twelve brush strokes over the photo: 32% of it, a long edge to feather
    rng = np.random.default_rng(0)
    for _ in range(12):
        points = [tuple(rng.integers(200, 3900, 2).tolist()) for _ in range(4)]
        ImageDraw.Draw(mask).line(points, fill=255, width=int(rng.integers(60, 200)), joint="curve")
    mask.save(strokes)
    return png, jpeg, small, large, strokes


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
    inpainter = Inpainter.load(str(tiny), Settings(device="cpu", weights_manifest_sha256=manifest_pin(tiny)))
    png, jpeg, small, large, strokes = _prepost_files()
    stages = ("decode", "prepare", "composite", "encode")
    rows = []
    for label, photo, mask_path in (
        ("PNG in, PNG out, 800x600 mask", png, small),
        ("JPEG in, PNG out, 800x600 mask", jpeg, small),
        ("JPEG in, PNG out, 3500x3500 mask (the whole photo is the crop)", jpeg, large),
        ("JPEG in, PNG out, 12 brush strokes over the photo (32% of it)", jpeg, strokes),
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


def bench_speedups(runs: int, rounds: int = 3) -> list[list[object]]:
    """Pre/post of realistic 4096x4096 uploads with each second code path on, and with its plain
    alternative instead: distances by scipy's transform only (no stamping, no cost model), PNG
    written by Pillow (no strips). (The photo decoded in a thread beside the mask work measured too
    little gain and is gone: "speed-ups" of 2026-12-02 in RESULTS.md.) Medians of `runs`,
    the variants interleaved over `rounds` rounds; ms of the prediction's wall time less the model's
    own stages (the tiny model at 64x64): decode, mask work, crops, paste and encode."""
    from unittest import mock

    from inpaint import codec, compositing
    from inpaint.config import Settings
    from inpaint.inputs import check_inputs
    from inpaint.service import Inpainter

    tiny = CACHE / "tiny-weights"
    if not (tiny / "model_index.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "script" / "make-tiny-weights"), str(tiny)], check=True)
    inpainter = Inpainter.load(str(tiny), Settings(device="cpu", weights_manifest_sha256=manifest_pin(tiny)))
    _prepost_files()
    uploads = {
        "JPEG, 800x600 mask": (CACHE / "photo-4096.jpg", CACHE / "mask-4096.png"),
        "PNG, 800x600 mask": (CACHE / "photo-4096.png", CACHE / "mask-4096.png"),
        "JPEG, 12 brush strokes": (CACHE / "photo-4096.jpg", CACHE / "mask-4096-strokes.png"),
    }

    def pillow_png(level: int):
        def write(pixels, path, map=map):
            Image.fromarray(pixels).save(path, format="PNG", compress_level=level)
        return write

    variants = {
        "as built": [],
        "distances by transform only": [mock.patch.object(compositing, "_stamped", lambda *args: None)],
        "PNG by Pillow, level 6": [mock.patch.object(codec, "_write_png", pillow_png(6))],
        "PNG by Pillow, level 1": [mock.patch.object(codec, "_write_png", pillow_png(1))],
    }
    stages = ("decode", "prepare", "composite", "encode")
    totals: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for upload, (photo, mask_path) in uploads.items():
            for variant, patches in variants.items():
                for patch in patches:
                    patch.start()
                try:
                    for _ in range(runs):
                        out = Path(tempfile.mkdtemp())
                        request = check_inputs(seed=1, num_inference_steps=1, width=64, height=64,
                                               disable_safety_checker=True)
                        start = time.perf_counter()
                        timings = inpainter.inpaint(photo, mask_path, request, out).metrics["timings"]
                        wall = time.perf_counter() - start
                        # Wall time less the model's own stages: all the pixel work, whichever stage it is in.
                        model = sum(seconds for stage, seconds in timings.items() if stage not in stages)
                        totals.setdefault((upload, variant), []).append(1000 * (wall - model))
                        shutil.rmtree(out, ignore_errors=True)
                finally:
                    for patch in patches:
                        patch.stop()
    rows = []
    for (upload, variant), values in totals.items():
        built = statistics.median(totals[upload, "as built"])
        median = statistics.median(values)
        rows.append([f"{upload}: {variant}", f"{median:.0f}", f"{median / built:.2f}"])
    return rows


def run_speedups(runs: int) -> tuple[str, dict]:
    rows = bench_speedups(runs)
    report = (f"## Pre/post speed-ups against their plain alternatives: {machine()}\n\n4096x4096 uploads, a prediction's "
              f"wall time less the model's own stages (decode, mask work, crops, paste, encode), ms, median of {runs} runs in each of 3 rounds (ratio to as "
              f"built; over 1: the plain alternative is slower):\n\n" + table(["upload: variant", "ms", "ratio"], rows))
    return report, {"speedups_ms": {row[0]: _number(row[1]) for row in rows}}


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


def _evict_page_cache(folder: Path) -> None:
    """Drop the weight files from the page cache (a cold disk, as after a machine boots)."""
    for path in folder.rglob("*.safetensors"):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def bench_cold_starts(folder: Path, runs: int) -> list[list[object]]:
    """Process start to READY through Cog's server: a first start (sha256 of every file), and later
    starts with the page cache cold and warm; median of `runs`, the conditions interleaved."""
    from inpaint.weights import read_ahead as _warm_page_cache

    conditions = {
        "first start (no verified stamp: sha256 of every file), page cache warm": (True, _warm_page_cache),
        "later start, page cache cold (weight files evicted)": (False, _evict_page_cache),
        "later start, page cache warm": (False, _warm_page_cache),
    }
    seconds: dict[str, list[float]] = {label: [] for label in conditions}
    for _ in range(runs):
        for label, (first, prepare) in conditions.items():
            if first:
                forget_verification()
            prepare(folder)
            text = _cold_start(folder)
            _progress(f"cold start, {label}: {text}")
            try:
                seconds[label].append(float(text.split(" s", 1)[0]))
            except ValueError:  # not measured, or failed: the text says why
                return [[label, text]]
    return [[label, f"{statistics.median(values):.1f}"] for label, values in seconds.items()]


def cold_start_section(folder: Path, runs: int, rows: list[list[object]] | None = None) -> str:
    where = f"on {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "on the CPU (fp32)"
    rows = bench_cold_starts(folder, runs) if rows is None else rows
    return (f"Cold start {where}, process start to READY through Cog's server (full-size weights, safety "
            f"checker included), seconds, median of {runs}:\n\n" + table(["start", "seconds"], rows))


def run_cold_start_only(runs: int) -> tuple[str, dict]:
    folder = build_full_size(CACHE / "full-size-weights", device="cuda" if torch.cuda.is_available() else "cpu")
    rows = bench_cold_starts(folder, runs)
    return f"## Cold start only: {machine()}\n\n" + cold_start_section(folder, runs, rows), {
        "cold_start_s": _by_label(rows, "later start, page cache warm")}


def run_prepost_only(runs: int) -> tuple[str, dict]:
    rows = bench_prepost(runs)
    return f"## Pre/post only: {machine()}\n\n" + table(
        ["input", "decode", "prepare", "composite", "encode", "total"], rows
    ), {"prepost_ms": {row[0]: _number(row[-1]) for row in rows}}


def run_cpu(runs: int) -> tuple[str, dict]:
    torch.set_num_threads(os.cpu_count() or 1)
    folder = build_full_size(CACHE / "full-size-weights")
    sections = [f"## CPU run: {machine()}"]
    sections.append("Full-size random weights (fp16 safetensors) against the published sizes:\n\n" + table(
        ["file", "bytes", "published", "same"],
        [[name, f"{ours:,}", f"{published:,}" if published else "-", ours == published] for name, ours, published in size_report(folder)],
    ))
    load = bench_load(folder, runs)
    sections.append(f"Load time to a ready model on the CPU (fp32), seconds, median of {runs} fresh processes:\n\n"
                    + table(["loader", "seconds"], load))
    prepost = bench_prepost(runs)
    sections.append(f"Pre/post-processing of a 4096x4096 photo (Inpainter.inpaint's own stage "
                    f"timings, model stages left out), ms, median of {runs}:\n\n"
                    + table(["input", "decode", "prepare", "composite", "encode", "total"], prepost))
    safety = bench_safety(folder, runs)
    sections.append(f"Safety checker (full-size ViT-L/14, fp32 on the CPU), ms, median of {runs}:\n\n"
                    + table(["batch", "ms", "ms per output"], safety))
    starts = bench_cold_starts(folder, runs)
    sections.append(cold_start_section(folder, runs, starts))
    return "\n\n".join(sections), {
        "load_s": _by_label(load, "ours, later starts (verified stamp; checker included)"),
        "prepost_ms": {row[0]: _number(row[-1]) for row in prepost},
        "safety_ms": _by_label(safety, "1 output"),
        "cold_start_s": _by_label(starts, "later start, page cache warm"),
    }


# ---------------------------------------------------------------- GPU comparison


def _inputs(size: int, height: int | None = None):
    width, height = size, height or size
    image = Image.open(ROOT / "examples" / "chelsea.png").convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse((width // 5, height // 6, width * 4 // 5, height * 2 // 3), fill=255)
    return image, mask


def _job(count: int, steps: int):
    """The request every GPU measurement makes: the same prompt, guidance, scheduler and seed."""
    from inpaint.pipeline import Generation

    return Generation("a cat wearing round sunglasses, photo", None, count, steps, 7.5, 1.0, "DPMSolverMultistep", 42)


def _load(folder: Path, device: torch.device, dtype: torch.dtype, fast: bool = True, **options):
    """Our pipeline as the service loads it, and its fast path (installed, and warmed up on a GPU);
    `options` are FastPath's (compile, cuda_graphs, cache_dir)."""
    from inpaint import pipeline as ours
    from inpaint.fastpath import FastPath

    path = FastPath(fast and device.type == "cuda", **options)
    pipe = ours.load_pipeline(folder, device, dtype, path)
    path.warm_up(pipe)
    return pipe, path


def _timeline(function, activities, categories: tuple[str, ...]) -> tuple[float, float, list[float], list[tuple[str, float]]]:
    """One run of `function` under torch's profiler: from its trace's events of `categories`, the
    span from the first one's start to the last one's end, the time inside at least one of them
    (busy), the gaps between them, all in ms, and the events' total ms by name, largest first."""
    from torch.profiler import profile

    with profile(activities=activities, acc_events=True) as profiler:  # one cycle: nothing to clear
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = [event for event in json.loads(trace.read_text())["traceEvents"]
                  if event.get("ph") == "X" and event.get("cat") in categories]
    by_name: Counter[str] = Counter()
    for event in events:
        by_name[event.get("name", "?")] += event.get("dur", 0) / 1000
    heaviest = by_name.most_common()
    intervals = sorted((event["ts"], event["ts"] + event.get("dur", 0)) for event in events)
    if not intervals:
        return 0.0, 0.0, [], []
    busy, gaps = 0.0, []
    start, end = intervals[0]
    for begin, finish in intervals[1:]:
        if begin > end:
            busy += end - start
            gaps.append((begin - end) / 1000)
            start = begin
        end = max(end, finish)
    busy += end - start
    return (end - intervals[0][0]) / 1000, busy / 1000, gaps, heaviest


def _gpu_busy(function, device: torch.device) -> str:
    """How much of one prediction's GPU span the GPU spent computing (kernels, copies), and its idle
    gaps: whether what lies outside the denoising loop's pace is GPU work or the GPU waiting. The
    heaviest kernels by name go to the progress log (stderr)."""
    if device.type != "cuda":
        return "GPU timeline: no CUDA"
    from torch.profiler import ProfilerActivity

    try:
        span, busy, gaps, heaviest = _timeline(function, [ProfilerActivity.CUDA], ("kernel", "gpu_memcpy", "gpu_memset"))
    except Exception as error:  # a diagnostic: never the reason a run fails
        return f"GPU timeline: profiler failed ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    _progress("heaviest GPU work by name (ms in one run): "
              + "; ".join(f"{name[:90]} {milliseconds:.1f}" for name, milliseconds in heaviest[:12]))
    idle = sorted(gaps, reverse=True)
    return (f"GPU timeline (one profiled run): busy {busy:.0f} of {span:.0f} ms; {sum(1 for gap in gaps if gap > 0.1)} "
            f"gaps over 0.1 ms, {sum(gap for gap in gaps if gap > 0.1):.0f} ms in all; largest "
            + ", ".join(f"{gap:.1f}" for gap in idle[:3]) + " ms")


def _unet_replays(pipe, device: torch.device, calls: int = 51) -> str:
    """GPU ms of `calls` replays of the UNet's most recently used CUDA graph, back to back (a 50-step
    prediction calls the UNet 51 times): the denoising loop's floor with this UNet, apart from the
    scheduler's own kernels and the host."""
    from inpaint.fastpath import FastPart

    part = pipe.unet.forward
    if device.type != "cuda" or not isinstance(part, FastPart) or part.graphs is None:
        return "UNet replays: no CUDA graph"
    recorded = [entry for entry in part.graphs.graphs.values() if hasattr(entry, "graph")]
    if not recorded:
        return "UNet replays: no CUDA graph"
    from inpaint.stopwatch import Stopwatch

    graph = recorded[-1].graph
    graph.replay()
    watch = Stopwatch(device)
    with watch.time("replays"):
        for _ in range(calls):
            graph.replay()
    return f"{calls} UNet replays {1000 * watch.read()['replays']:.0f} ms"


def _graph_memory(fast_path) -> tuple[str, float | None]:
    """The UNet's CUDA graphs kept (fastpath/graphs.py): a line, and the GiB their pools hold."""
    part = fast_path.parts.get("unet")
    if part is None or part.graphs is None or part.graphs.max_kept_bytes is None:
        return "none recorded", None
    graphs = part.graphs
    held = graphs.kept_bytes() / 2**30
    kept = sum(1 for entry in graphs.graphs.values() if hasattr(entry, "graph"))
    return f"{kept}, {held:.2f} GiB of their {graphs.max_kept_bytes / 2**30:.2f} GiB budget", round(held, 3)


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
    return relative_error(latents[1], latents[0])


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


def _cold_start(folder: Path, predict: bool = False, env: dict[str, str] | None = None,
                figures: dict | None = None, repeats: int = 1, size: int = 512, steps: int = 50) -> str:
    """Seconds from starting Cog's server to READY (needs cog installed), with the sha256 stamp in place,
    and where setup spent them (its own log line). With `predict`, also the first `size`x`size`
    prediction through HTTP and `repeats` more: wall time at the client and the first two's own stage
    timings. `figures`, if given, receives ready_s, first_ms and second_ms, and, of the repeats,
    steady_ms (the median at the client), steady_stages_ms (each stage's median as the server timed it)
    and steady_gil (which of the server worker's threads held the GIL meanwhile: bench/gil.py)."""
    figures = {} if figures is None else figures
    try:
        sys.path.insert(0, str(ROOT / "script"))
        from cogserver import CogServer, data_uri
    except ImportError:
        return "not measured (cog is not installed)"
    log = Path(tempfile.mkdtemp()) / "server.log"
    started = time.monotonic()
    server = CogServer(folder, log_path=log, env={
        "INPAINT_SAFETY_CHECKER": "1", "INPAINT_WEIGHTS_MANIFEST_SHA256": manifest_pin(folder), **(env or {}),
    })
    try:
        server.start(timeout=300)
        figures["ready_s"] = round(time.monotonic() - started, 2)
        text = f"{figures['ready_s']:.1f} s (safety checker included)"
        setup = [line for line in log.read_text(errors="replace").splitlines() if "setup:" in line]
        if setup:
            text += f"; the server's log: `{setup[-1].split('setup:', 1)[1].split('\"')[0].strip()}`"
        if not predict:
            return text
        body = {"image": data_uri(ROOT / "examples" / "chelsea.png"), "mask": data_uri(ROOT / "examples" / "chelsea-mask.png"),
                "prompt": "a cat wearing round sunglasses, photo", "width": size, "height": size,
                "num_inference_steps": steps, "scheduler": "DPMSolverMultistep", "seed": 42}
        # without shipped parts, the server compiles the parts at this size beside these predictions
        beside = "" if (env or {}).get("INPAINT_COMPILED_MANIFEST_SHA256") else "; on a GPU the compile worker is busy meanwhile"
        done = []  # (ms at the client, the server's timings) of each prediction that succeeded

        def run(number: int) -> bool:
            nonlocal text
            begin = time.monotonic()
            status, response = server.predict(body)
            if status != 200 or response.get("status") != "succeeded":
                text += f"; prediction {number} failed: {status} {str(response)[:300]}"
                return False
            done.append((1000 * (time.monotonic() - begin), response["metrics"]["timings"]))
            return True

        if run(1):
            with gil.GilSampler(gil.worker(server.process.pid)) as holders:  # who else takes the GIL meanwhile
                all(run(number) for number in range(2, 2 + repeats))
            figures["steady_gil"] = holders.figures()
        for attempt, (milliseconds, timings) in zip(("first", "second"), done):
            figures[f"{attempt}_ms"] = round(milliseconds, 1)
            stages = ", ".join(f"{k} {1000 * v:.0f}" for k, v in timings.items())
            text += f"; {attempt} {size}x{size} prediction through HTTP {milliseconds:.0f} ms (stages, ms: {stages}{beside})"
        later = done[1:]
        if len(later) > 1:
            figures["steady_ms"] = round(statistics.median(milliseconds for milliseconds, _ in later), 1)
            figures["steady_stages_ms"] = median_stages([timings for _, timings in later])
            stages = ", ".join(f"{k} {v:.0f}" for k, v in figures["steady_stages_ms"].items())
            text += (f"; the median of the {len(later)} after the first {figures['steady_ms']:.0f} ms (each stage's "
                     f"median, ms: {stages}); during them {holders.text()}")
        return text
    except Exception as error:  # report, do not lose the rest of the table
        return f"failed: {error}; log tail: {log.read_text(errors='replace')[-1500:] if log.exists() else ''}"
    finally:
        server.stop()


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
    image, mask = _inputs(size)
    job = _job(1, steps)

    def timed(pipe, scheduler: str = "DPMSolverMultistep") -> float:
        run_job = dataclasses.replace(job, scheduler=scheduler)
        milliseconds, _ = median_ms(lambda: ours.generate(pipe, [image], [mask], run_job), device, runs)
        return milliseconds

    rows = []

    def add(row: list[object]) -> None:
        rows.append(row)
        _progress("lever: " + " | ".join(str(cell) for cell in row))

    baseline = timed(fast)
    timeline = _gpu_busy(lambda: ours.generate(fast, [image], [mask], job), device)
    add(["fast path uncompiled (the default until its compiled parts are ready: CUDA graphs, channels_last UNet, "
         f"sliced VAE; {_unet_replays(fast, device)}; {timeline})", f"{baseline:.0f}", "1.00"])
    for label, options in (
        ("CUDA graphs off (INPAINT_CUDA_GRAPHS=0)", {"cuda_graphs": False}),
        ("fast path off (INPAINT_FAST_PATH=0): fp16 + SDPA only", {"fast": False}),
    ):
        other, other_path = _load(folder, device, dtype, **options)
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

    image, mask = _inputs(512)
    job = _job(1, steps)
    rows: list[list[object]] = []
    empty_prompt = ours.EmptyPrompt()  # as the service holds it

    def add(label: str, milliseconds: float) -> None:
        rows.append([label, f"{milliseconds:.0f}", f"{milliseconds / baseline:.2f}"])
        _progress("lever: " + " | ".join(rows[-1]))

    def timed(pipe, path) -> tuple[float, object, str]:
        """Median ms, the last output, and the last run's own stages (wall ms, synchronised around the VAE),
        with the cudaMalloc/cudaFree calls the timed runs made (a fragmented cache makes them costly)
        and one more run's GPU timeline (_gpu_busy)."""
        stages: dict[str, float] = {}
        ours.generate(pipe, [image], [mask], job, fast=path, empty_prompt=empty_prompt)  # warm-up (the CUDA graph's recording at a new UNet)
        stats = torch.cuda.memory_stats if device.type == "cuda" else lambda _: {}
        before = stats(device)
        each: list[float] = []
        for _ in range(2 * runs):  # twice the runs: these rows decide the 400 ms target; their spread is printed
            milliseconds, painted = median_ms(lambda: ours.generate(pipe, [image], [mask], job, stages, fast=path,
                                                                empty_prompt=empty_prompt), device, 1, warm_up=False)
            each.append(milliseconds)
        after = stats(device)
        calls = ", ".join(f"{key} {after.get(key, 0) - before.get(key, 0)}" for key in ("num_device_alloc", "num_device_free"))
        timeline = _gpu_busy(lambda: ours.generate(pipe, [image], [mask], job, fast=path), device)
        return statistics.median(each), painted, (
            f"runs {min(each):.0f}-{max(each):.0f}; last run's "
            + ", ".join(f"{name} {1000 * seconds:.0f}" for name, seconds in sorted(stages.items()))
            + f"; {calls}; {_unet_replays(pipe, device)}; {timeline}")

    def sources(workers) -> str:
        return ", ".join(f"{worker.part} {key} {worker.sources[key]} in {seconds:.1f} s"
                         for worker in workers for key, seconds in worker.seconds.items()) or "nothing compiled"

    cache = Path(tempfile.mkdtemp(prefix="compiled-"))  # cold: nothing saved, Inductor's cache empty
    if time.monotonic() + 180 > deadline:
        rows.append(["torch.compile in the background (the default)", "not run (time budget)", "-"])
        return rows
    try:
        begin = time.monotonic()
        pipe, path = _load(folder, device, dtype, compile="background", cache_dir=cache)
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
        agreement = f"; PSNR {_psnr(uncompiled[0][0], painted[0][0]):.1f} dB against the first, uncompiled" if uncompiled else ""
        add(f"compile=background, once predictions take the compiled UNet and VAE up (the default from then on{agreement}; "
            f"stages, ms: {stages})", milliseconds)
        pipe = workers = None  # released (a del would leave the lambdas above naming nothing)
        path.stop()
        ours.release_memory(device, path)
        begin = time.monotonic()
        later, path = _load(folder, device, dtype, compile="setup", cache_dir=cache)
        setup = time.monotonic() - begin
        milliseconds, _, stages = timed(later, path)
        add(f"compile=setup on a later start (saved compiled parts: {sources(path.compiled_parts)}; setup {setup:.0f} s; "
            f"stages, ms: {stages})", milliseconds)
        path.stop()
        later = path = None
    except Exception as error:  # report it and keep the rest of the run
        rows.append(["torch.compile in the background", f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}", "-"])
        _progress("lever: " + " | ".join(rows[-1]))
    ours.release_memory(device)
    return rows


def _progress(text: str) -> None:
    """A line on stderr as soon as a figure exists, so a run cut short still leaves what it measured."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _section(name: str, function, *args, **kwargs):
    """Run one part of the GPU run; a failure is printed with its traceback and the run goes on."""
    try:
        return function(*args, **kwargs)
    except Exception:
        import traceback

        _progress(f"{name} FAILED:\n{traceback.format_exc()}")
        return None


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


def _free_cache(device: torch.device) -> None:
    """Hand back cached blocks nothing uses (the CUDA graphs and their memory stay)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _weight_bytes(pipe) -> float:
    modules = (pipe.unet, pipe.vae, pipe.text_encoder)
    return float(sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()]))


def bench_shape(reference, fast, device, size: int, count: int, steps: int, runs: int, compare_latents: bool) -> list[object]:
    """One row of the main table: reference and ours on the same inputs and seed."""
    from inpaint import pipeline as ours

    image, mask = _inputs(size)
    job = _job(count, steps)

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
    _free_cache(device)  # ours starts from what the process would hold between its own predictions
    _reset_peak(device)
    ours_ms, our_images = median_ms(run_ours, device, runs)
    ours_peak, ours_reserved = _peak(device, foreign=reference_weights)
    psnr = min(_psnr(a, b) for a, b in zip(reference_images, our_images))
    agreement = f"PSNR {psnr:.1f} dB"
    if compare_latents:
        agreement += f", latents rel. err {_latent_error(reference, fast, image, mask, job):.1e}"
    return [f"{size}x{size} x{count}", f"{reference_ms:.0f}", f"{ours_ms:.0f}", f"{reference_ms / ours_ms:.2f}",
            f"{reference_peak:.2f} / {ours_peak:.2f} ({ours_reserved:.2f})", agreement]


def bench_memory_only(fast, device, size: int, count: int, steps: int) -> list[object]:
    """Ours alone, one run without warm-up: the peak memory of the largest batch (the 16 GB target)."""
    from inpaint import pipeline as ours

    image, mask = _inputs(size)
    job = _job(count, steps)
    _free_cache(device)  # the CUDA graphs recorded so far stay, as they would in a running server
    _reset_peak(device)
    milliseconds, _ = median_ms(lambda: ours.generate(fast, [image], [mask], job), device, runs=1, warm_up=False)
    peak, reserved = _peak(device)
    return [f"{size}x{size} x{count} (ours only, one run, no warm-up)", "-", f"{milliseconds:.0f}", "-",
            f"- / {peak:.2f} ({reserved:.2f})", "-"]


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
            image, mask = _inputs(size)
            job = _job(1, steps)
            timings: dict[str, float] = {}
            milliseconds, _ = median_ms(lambda: ours.generate(pipe, [image], [mask], job, timings), device,
                                    runs if size <= 512 else 2)
            rows.append([label, f"{size}x{size}", f"{milliseconds:.0f}",
                         *(f"{1000 * timings.get(stage, float('nan')):.0f}" for stage in ("denoise", "vae_encode", "vae_decode"))])
            _progress("part: " + " | ".join(rows[-1]))
        pipe = None
        ours.release_memory(device)
    return rows


def _startup_imports() -> list[list[object]]:
    """Fresh interpreters doing part of a cold start's work, timed, and the import time by package."""
    rows = []
    for label, code in (
        ("python -c pass (the interpreter and its site-packages' .pth files)", "pass"),
        ("python -c 'import torch'", "import torch"),
        ("... + CUDA context", "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
         if torch.cuda.is_available() else "import torch"),
        ("python -c 'import predict' (cog, inpaint's light modules)", "import predict"),
        ("... + the modules setup imports (diffusers, transformers, inpaint.service)", "import predict, inpaint.service"),
    ):
        begin = time.monotonic()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
        rows.append([label, f"{time.monotonic() - begin:.2f} s"])
        _progress("startup: " + " | ".join(rows[-1]))
    rows.append(["self time of the imports by package (python -X importtime, top 10)", _import_time_by_package()])
    _progress("startup: " + " | ".join(rows[-1]))
    return rows


def run_startup(runs: int) -> str:
    """--startup: where a cold start goes in this interpreter's environment (run it again under
    bench/requirements-only-env's interpreter for the image's package set alone)."""
    import importlib.metadata

    folder = build_full_size(CACHE / "full-size-weights", device="cuda" if torch.cuda.is_available() else "cpu")
    rows = _startup_imports()
    installed = len({dist.metadata["Name"].lower() for dist in importlib.metadata.distributions()})
    return (f"## Cold start breakdown: {machine()}\n\nInterpreter `{sys.executable}`, {installed} distributions "
            "installed. Fresh processes, page cache warm:\n\n" + table(["what", "time"], rows)
            + "\n\n" + cold_start_section(folder, runs))


def bench_startup(folder: Path, deadline: float) -> list[list[object]]:
    """Where a cold start goes: fresh interpreters doing part of the work, then Cog's server to READY
    (weights already verified), then with INPAINT_COMPILE=setup twice (the second loads the compiled
    UNet and VAE the first saved), each while `deadline` allows."""
    rows = _startup_imports()
    setup = {"INPAINT_COMPILE": "setup", "INPAINT_COMPILE_CACHE": tempfile.mkdtemp(prefix="compiled-")}
    for label, env, cost in (("Cog server to READY (default; first start: sha256 of every weight file)", {}, 30),
                             ("... again (verified stamp in place)", {}, 30),
                             ("... with INPAINT_COMPILE=setup, nothing saved yet (compiles in setup: three parts, "
                              "~160 s on an H100)", setup, 180),
                             ("... with INPAINT_COMPILE=setup again (loads the saved compiled UNet and VAE)", setup, 60)):
        if time.monotonic() + cost > deadline:
            rows.append([label, "not run (time budget)"])
        else:
            rows.append([label, _cold_start(folder, env=env)])
        _progress("startup: " + " | ".join(rows[-1]))
    return rows


def _import_time_by_package(code: str = "import predict, inpaint.service") -> str:
    """Where a fresh interpreter's import time goes, summed per top-level package."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True)
    totals: dict[str, int] = {}
    for line in result.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[0].strip().isdigit():
            package = parts[2].strip().split(".")[0]
            totals[package] = totals.get(package, 0) + int(parts[0])
    top = sorted(totals.items(), key=lambda item: -item[1])[:10]
    return ", ".join(f"{name} {microseconds / 1e6:.2f} s" for name, microseconds in top) + f" (all: {sum(totals.values()) / 1e6:.1f} s)"


def run_parts(runs: int, tiny: bool, budget: float) -> str:
    """--parts: which part of the fast path pays at which size, and where a cold start goes."""
    from inpaint import pipeline as ours

    started = time.monotonic()
    device, dtype = ours.pick_device()
    folder = _weights(tiny, device)
    sizes, steps = ((64, 128), 3) if tiny else ((512, 768, 1024), 50)
    parts = _section("parts", bench_parts, folder, device, dtype, runs, steps, sizes) or []
    startup = [] if tiny else _section("startup", bench_startup, folder, started + budget) or []
    _progress(f"whole run {time.monotonic() - started:.0f} s")
    return (f"## Fast path parts: {machine()}\n\nOne output, {steps} steps, DPMSolverMultistep; median ms after a warm-up "
            f"({runs} runs at 512, 2 above), with the last run's own stage timings:\n\n"
            + table(["parts on", "size", "prediction ms", "denoise ms", "VAE encode ms", "VAE decode ms"], parts)
            + "\n\nWhere a cold start goes (fresh processes, page cache warm):\n\n" + table(["what", "time"], startup))


def _weights(tiny: bool, device: torch.device) -> Path:
    """The tiny random checkpoint (written once), or full-size random weights built from the real configs."""
    if not tiny:
        return build_full_size(CACHE / "full-size-weights", device=device)
    folder = CACHE / "tiny-weights"
    if not (folder / "model_index.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "script" / "make-tiny-weights"), str(folder)], check=True)
    return folder


def _reference(folder: Path, device: torch.device, dtype: torch.dtype):
    """diffusers' own StableDiffusionInpaintPipeline on `folder`, fp16 on a GPU, DPMSolverMultistep, no checker."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionInpaintPipeline

    reference = StableDiffusionInpaintPipeline.from_pretrained(
        folder, variant="fp16", dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    reference.scheduler = DPMSolverMultistepScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    return reference


def run_gpu(runs: int, tiny: bool, quick: bool = False, budget: float = 480.0) -> tuple[str, dict]:
    """The GPU comparison; `budget` seconds from the start bound the optional compile levers."""
    from inpaint import pipeline as ours

    started = time.monotonic()
    device, dtype = ours.pick_device()
    folder = _weights(tiny, device)
    if tiny:
        shapes, memory_shape, steps = [(64, 1, runs), (128, 2, 2)], (128, 4), 3
    else:
        _progress(f"full-size weights ready after {time.monotonic() - started:.0f} s")
        # (size, outputs, timed runs): the larger shapes get fewer runs, to keep the whole run near 6 minutes
        shapes, memory_shape, steps = [(512, 1, runs), (768, 1, 3), (1024, 1, 2), (512, 4, 2)], (1024, 4), 50
        if quick:
            shapes, memory_shape = shapes[:1], None
    reference = _reference(folder, device, dtype)
    begin = time.monotonic()
    fast, fast_path = _load(folder, device, dtype)
    _progress(f"our pipeline loaded and warmed up in {time.monotonic() - begin:.1f} s")
    rows = []
    for index, (size, count, shape_runs) in enumerate(shapes):
        row = _section(f"{size}x{size} x{count}", bench_shape, reference, fast, device, size, count, steps, shape_runs, index == 0)
        if row:
            rows.append(row)
            _progress(" | ".join(rows[-1]))
    graph_memory = _graph_memory(fast_path)
    _progress(f"CUDA graphs after the shapes: {graph_memory[0]}")
    reference = None
    _free_cache(device)
    if memory_shape:
        row = _section("memory", bench_memory_only, fast, device, *memory_shape, steps)
        if row:
            rows.append(row)
            _progress(" | ".join(rows[-1]))
    levers = _section("levers", bench_levers, folder, fast, fast_path, device, dtype, runs, steps, tiny) or []
    baseline = float(levers[0][1]) if levers else float("nan")
    fast = None
    ours.release_memory(device, fast_path)
    fast_path = None
    cold = "not measured on tiny weights" if tiny else _cold_start(folder, predict=True)
    _progress(f"cold start: {cold}")
    safety = _section("safety", _safety_on, folder, device, dtype, runs)
    _progress(f"safety checker: {safety}; {time.monotonic() - started:.0f} s so far")
    if tiny or device.type != "cuda":
        levers.append(["+ torch.compile(unet)", "not run (" + ("tiny weights" if tiny else "no CUDA") + ")", "-"])
    else:
        levers += _section("compile", bench_compile, folder, device, dtype, runs, steps, baseline, started + budget) or []
    _progress(f"whole run {time.monotonic() - started:.0f} s")
    title = "Smoke test on tiny weights (not a measurement)" if tiny else "GPU run"
    first = rows[0] if rows else [None] * 6
    figures = {
        "reference_ms": _number(first[1]),
        "uncompiled_ms": _number(first[2]),
        "psnr_db": _psnr_of(first[5]),
        "shapes_ms": {row[0]: _number(row[2]) for row in rows[1:] if _number(row[2]) is not None},
        "default_ms": _by_label(levers, "compile=background, once predictions take"),
        "saved_parts_ms": _by_label(levers, "compile=setup on a later start"),
        "during_compile_ms": _by_label(levers, "compile=background (the default), while"),
        "cold_start_s": _number(cold) if not tiny else None,
        "safety_ms": _number(safety),
        "graphs_gib": graph_memory[1],
    }
    report = (f"## {title}: {machine()}\n\n{steps} steps, guidance 7.5, DPMSolverMultistep, median after a warm-up; "
            "ours is the fast path uncompiled (as before its compiled UNet is ready; compiled: the lever table):\n\n") + table(
        ["shape", "reference ms", "ours ms", "ratio", "peak GiB ref / ours (ours reserved)", "agreement"], rows
    ) + (f"\n\nCUDA graphs kept after those shapes: {graph_memory[0]}"
         f"\n\nCold start, process start to READY through Cog's server, weights on local disk: {cold}"
         f"\n\nSafety checker added time: {safety}"
         f"\n\nLevers one at a time, {'64x64' if tiny else '512x512'} x1, {steps} steps, our prediction path, "
         f"median ms (ratio to the default fast path; under 1 is faster):\n\n"
         + table(["configuration", "ms", "ratio"], levers))
    return report, figures


def _every_shape(folder: Path, device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int]], steps: int,
                 runs: int, reference_ms: float,
                 deadline: float = float("inf")) -> tuple[list[list[str]], dict[str, float], tuple[str, float | None]]:
    """Ours uncompiled at each shape, steady state (one warm-up each records its CUDA graph), no shape
    begun after `deadline` (time.monotonic()): the table's rows, shapes_ms, and the CUDA graphs' memory
    after them. A shape not measured has a row that says so, and no entry in shapes_ms."""
    from inpaint import pipeline as ours

    fast, fast_path = _load(folder, device, dtype)
    empty_prompt = ours.EmptyPrompt()  # as the service holds it
    rows, shapes_ms = [], {}
    for index, (width, height) in enumerate(shapes):
        if time.monotonic() >= deadline:  # the run's figures are written only at its end: end it in time
            rows += [[f"{w}x{h}", "not measured: the run's --budget was spent", ""] for w, h in shapes[index:]]
            _progress(f"budget spent: {len(shapes) - index} of {len(shapes)} shapes not measured")
            break
        image, mask = _inputs(width, height)
        milliseconds, _ = median_ms(lambda: ours.generate(fast, [image], [mask], _job(1, steps), empty_prompt=empty_prompt),
                                device, runs)
        shapes_ms[f"{width}x{height}"] = round(milliseconds, 1)
        rows.append([f"{width}x{height}", f"{milliseconds:.0f}", f"{milliseconds / reference_ms:.2f}"])
        _progress(" | ".join(rows[-1]))
    graph_memory = _graph_memory(fast_path)
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
    folder = _weights(tiny, device)
    shapes, steps = (geometry.automatic_working_sizes()[:3], 3) if tiny else (geometry.automatic_working_sizes(), 50)
    reference = _reference(folder, device, dtype)
    image, mask = _inputs(512)
    reference_ms, _ = median_ms(lambda: reference(
        prompt=_job(1, steps).prompt, image=image, mask_image=mask, height=512, width=512, num_inference_steps=steps,
        guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(42)).images, device, runs)
    _progress(f"reference 512x512 x1: {reference_ms:.0f} ms")
    reference = None
    _free_cache(device)
    rows, shapes_ms, graph_memory = _every_shape(folder, device, dtype, shapes, steps, runs, reference_ms, started + budget)
    _progress(f"whole run {time.monotonic() - started:.0f} s")
    title = "Every automatic working shape, smoke test on tiny weights (not a measurement)" if tiny else "Every automatic working shape"
    report = (f"## {title}: {machine()}\n\n{steps} steps, guidance 7.5, DPMSolverMultistep, one output, median of {runs} "
              f"after a warm-up; ours is the fast path uncompiled. diffusers' reference at 512x512 in the same run: "
              f"{reference_ms:.0f} ms.\n\n" + table(["working shape", "ours ms", "ratio to the reference"], rows)
              + f"\n\nCUDA graphs kept after them: {graph_memory[0]}")
    return report, {"reference_ms": round(reference_ms, 1), "shapes_ms": shapes_ms, "graphs_gib": graph_memory[1]}


def _bake(folder: Path, size: int, timeout: float | None = None) -> tuple[str, float]:
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
    _progress(f"baked {size}x{size} in {bake_s:.0f} s; manifest {pin}")
    return pin, bake_s


def _our_stages(pipe, fast_path, size: int, steps: int, runs: int) -> dict[str, float]:
    """Each model stage's median over `runs` predictions at size x size in this process, ms, as
    pipeline.generate times them for the server's metrics (text_encode, vae_encode, denoise, vae_decode)."""
    image, mask = _inputs(size)
    predict = candidates.predictor(pipe, fast_path, image, mask, _job(1, steps))
    return median_stages([predict() for _ in range(runs)])


def run_targets(runs: int, tiny: bool, budget: float = float("inf")) -> tuple[str, dict]:
    """Every figure issue 20's targets name, in one device run: script/bake-compiled at 512x512 (64x64 on
    tiny weights); a fresh server that loads the baked parts, the checker on (cold_start_s, fresh_first_ms,
    and http_e2e_ms: the median at the client of `runs` predictions after the first, with the server's
    stage medians, http_stages_ms); then in this process diffusers' reference and the default path on the
    shipped parts at that size (reference_ms, default_ms, psnr_db, and its stage medians, default_stages_ms,
    to set beside the server's), part 4's candidates (bench/candidates.py), and every automatic working
    shape uncompiled (shapes_ms, graphs_gib), none begun `budget` seconds after the start. A bake that fails,
    or takes over half the budget, leaves out the fresh server, and the rest is measured uncompiled."""
    from inpaint import geometry
    from inpaint import pipeline as ours
    from inpaint.fastpath import artifact

    started = time.monotonic()
    device, dtype = ours.pick_device()
    folder = _weights(tiny, device)
    size, steps = (64, 3) if tiny else (512, 50)
    shapes = geometry.automatic_working_sizes()[:3] if tiny else geometry.automatic_working_sizes()
    served: dict = {}
    try:  # at most half the budget: a bake that does not end still leaves the rest of the run its time
        pin, bake_s = _bake(folder, size, timeout=budget / 2 if budget < float("inf") else None)
    except RuntimeError as error:  # the rest is measured uncompiled, so that the run still ends with figures
        pin, bake_s, text = "", None, f"not measured: {error}"
        baked = f"No compiled parts: {error}. So no fresh server on them, and ours below is uncompiled"
    else:
        baked = f"script/bake-compiled at {size}x{size}: {bake_s:.0f} s. A fresh server on them (manifest pinned, checker on)"
        text = _cold_start(folder, predict=True, env={"INPAINT_COMPILED_MANIFEST_SHA256": pin}, figures=served,
                           repeats=runs, size=size, steps=steps)
    _progress(f"fresh server with the shipped parts: {text}")
    reference = _reference(folder, device, dtype)
    fast, fast_path = _load(folder, device, dtype, compile="background" if pin else "off", cache_dir=Path(tempfile.mkdtemp()),
                            artifact=folder / artifact.FOLDER if pin else None, artifact_pin=pin)
    row = _section(f"{size}x{size} x1", bench_shape, reference, fast, device, size, 1, steps, runs, False) or [None] * 6
    _progress(" | ".join(map(str, row)))
    stages = _section("stages", _our_stages, fast, fast_path, size, steps, runs) or {}
    _progress(f"ours, each stage's median in this process, ms: {stages}")
    tried = _section("candidates", _candidates, folder, reference, fast, fast_path, device, dtype, size, steps, runs) or {}
    reference = fast = None
    ours.release_memory(device, fast_path)
    fast_path = None
    _free_cache(device)
    rows, shapes_ms, graph_memory = _every_shape(folder, device, dtype, shapes, steps, runs, _number(row[1]) or float("nan"),
                                                 started + budget)
    _progress(f"whole run {time.monotonic() - started:.0f} s")
    title = "Issue 20's figures, smoke test on tiny weights (not a measurement)" if tiny else "Issue 20's figures"
    report = (f"## {title}: {machine()}\n\n{steps} steps, guidance 7.5, DPMSolverMultistep, one output, median of {runs} "
              f"after a warm-up. {baked}: {text}\n\nIn this process, the default path "
              f"{'on the shipped parts' if pin else 'uncompiled'} against diffusers' reference:\n\n"
              + table(["shape", "reference ms", "ours ms", "ratio", "peak GiB ref / ours (ours reserved)", "agreement"], [row])
              + "\n\nOurs in this process, each model stage's median, ms (the server's are above): "
              + ", ".join(f"{stage} {ms:.0f}" for stage, ms in stages.items())
              + "\n\nPart 4's candidates, each beside what runs today (bench/candidates.py):\n\n"
              + (candidates.report(tried) if tried else "not measured (the section failed; its error is above)")
              + "\n\nEvery automatic working shape, ours uncompiled:\n\n"
              + table(["working shape", "ours ms", "ratio to the reference"], rows)
              + f"\n\nCUDA graphs kept after them: {graph_memory[0]}")
    return report, {"reference_ms": _number(row[1]), "default_ms": _number(row[2]), "psnr_db": _psnr_of(row[5]),
                    "shapes_ms": shapes_ms, "fresh_first_ms": served.get("first_ms"), "http_e2e_ms": served.get("steady_ms"),
                    "http_stages_ms": served.get("steady_stages_ms"), "default_stages_ms": stages,
                    "http_gil": served.get("steady_gil"),
                    "cold_start_s": served.get("ready_s"), "graphs_gib": graph_memory[1],
                    "bake_s": round(bake_s, 1) if bake_s is not None else None,
                    "candidates": tried or None}


def _candidates(folder: Path, reference, fast, fast_path, device: torch.device, dtype: torch.dtype, size: int,
                steps: int, runs: int) -> dict:
    """bench/candidates.py's figures at size x size, with the safety checker loaded for them and freed after."""
    from inpaint.safety import SafetyChecker

    checker = SafetyChecker.load(folder, device, dtype)
    image, mask = _inputs(size)
    figures = candidates.measure(reference, fast, fast_path, checker, device, dtype, image, mask, _job(1, steps), runs)
    _progress("candidates:\n" + candidates.report(figures))
    return figures


def run_candidates(runs: int, tiny: bool) -> tuple[str, dict]:
    """Part 4's candidates alone (bench/candidates.py), on the default fast path uncompiled: a short run."""
    from inpaint import pipeline as ours

    started = time.monotonic()
    device, dtype = ours.pick_device()
    folder = _weights(tiny, device)
    size, steps = (64, 3) if tiny else (512, 50)
    reference = _reference(folder, device, dtype)
    fast, fast_path = _load(folder, device, dtype)
    figures = _candidates(folder, reference, fast, fast_path, device, dtype, size, steps, runs)
    _progress(f"whole run {time.monotonic() - started:.0f} s")
    title = "Part 4's candidates, smoke test on tiny weights (not a measurement)" if tiny else "Part 4's candidates"
    return (f"## {title}: {machine()}\n\nAt {size}x{size}, {steps} steps; ours is the fast path uncompiled; per-call "
            f"figures are medians of 20 calls, stages medians of {runs} predictions (of one beside a busy thread):\n\n"
            + candidates.report(figures)), {"candidates": figures}


def run_shipped(tiny: bool) -> tuple[str, dict]:
    """Compiled parts shipped with the weights: script/bake-compiled at 512x512 (64x64 on tiny weights)
    into a COG_WEIGHTS folder, then a fresh server that loads them (pinned by
    INPAINT_COMPILED_MANIFEST_SHA256): its cold start and its first two predictions through HTTP."""
    folder = _weights(tiny, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    size = 64 if tiny else 512
    try:
        pin, bake_s = _bake(folder, size)
    except RuntimeError as error:
        return f"## Shipped compiled parts: {machine()}\n\n{error}", {}
    figures: dict = {}
    text = _cold_start(folder, predict=True, env={"INPAINT_COMPILED_MANIFEST_SHA256": pin}, figures=figures)
    _progress(f"fresh server with the shipped parts: {text}")
    return (f"## Shipped compiled parts: {machine()}\n\nscript/bake-compiled at {size}x{size}: {bake_s:.0f} s. "
            f"A fresh server with them (COG_WEIGHTS folder, manifest pinned): {text}"), {
        "bake_s": round(bake_s, 1), "cold_start_s": figures.get("ready_s"),
        "fresh_first_ms": figures.get("first_ms"), "fresh_second_ms": figures.get("second_ms")}


def run_compile_only(runs: int, budget: float) -> tuple[str, dict]:
    """GPU: the default fast path uncompiled, then the compiled rows of the lever table (bench_compile)."""
    from inpaint import pipeline as ours

    started = time.monotonic()
    device, dtype = ours.pick_device()
    folder = build_full_size(CACHE / "full-size-weights", device=device)
    fast, fast_path = _load(folder, device, dtype)
    image, mask = _inputs(512)
    baseline, _ = median_ms(lambda: ours.generate(fast, [image], [mask], _job(1, 50), empty_prompt=ours.EmptyPrompt()), device, runs)
    rows = [["fast path uncompiled (the default until its compiled parts are ready)", f"{baseline:.0f}", "1.00"]]
    _progress("lever: " + " | ".join(rows[-1]))
    fast = None
    ours.release_memory(device, fast_path)
    fast_path = None
    rows += _section("compile", bench_compile, folder, device, dtype, runs, 50, baseline, started + budget) or []
    _progress(f"whole run {time.monotonic() - started:.0f} s")
    return (f"## Compiled rows only: {machine()}\n\n512x512 x1, 50 steps, guidance 7.5, DPMSolverMultistep, our prediction "
            "path, median ms (ratio to the fast path uncompiled):\n\n" + table(["configuration", "ms", "ratio"], rows)), {
        "uncompiled_ms": baseline,
        "default_ms": _by_label(rows, "compile=background, once predictions take"),
        "saved_parts_ms": _by_label(rows, "compile=setup on a later start"),
        "during_compile_ms": _by_label(rows, "compile=background (the default), while"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU measurements (load time, pre/post, safety)")
    parser.add_argument("--prepost", action="store_true", help="only the 4096x4096 pre/post-processing timings (CPU)")
    parser.add_argument("--speedups", action="store_true",
                        help="pre/post with each second code path against its plain alternative (CPU)")
    parser.add_argument("--cold-start", action="store_true",
                        help="only the cold starts through Cog's server: first start, page cache cold and warm")
    parser.add_argument("--startup", action="store_true",
                        help="only where a cold start goes in this interpreter's environment, and its cold starts")
    parser.add_argument("--quick", action="store_true", help="GPU: only 512x512 x1 in the main table (a shorter rerun)")
    parser.add_argument("--parts", action="store_true",
                        help="GPU: the fast path's parts at 512/768/1024, and where a cold start goes")
    parser.add_argument("--compile-only", action="store_true",
                        help="GPU: only the fast path uncompiled and the compiled rows (a shorter run)")
    parser.add_argument("--shipped", action="store_true",
                        help="GPU: bake the compiled parts at 512x512, then a fresh server's cold start and first predictions")
    parser.add_argument("--targets", action="store_true",
                        help="GPU: every figure issue 20's targets name, in one run (bake, fresh server, reference, "
                             "default, every shape)")
    parser.add_argument("--candidates", action="store_true",
                        help="GPU: issue 20 part 4's candidates beside what runs today (text encoder and checker as CUDA "
                             "graphs, SDPA backends, predictions on other threads); also part of --targets")
    parser.add_argument("--every-shape", action="store_true",
                        help="GPU: every automatic working shape, uncompiled, beside the reference at 512x512")
    parser.add_argument("--tiny", action="store_true", help="smoke-test the GPU comparison on tiny weights")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--budget", type=float, default=480.0,
                        help="GPU: seconds from the start after which no compile lever (nor, with --targets or "
                             "--every-shape, no working shape) begins, so that the run ends and writes its figures "
                             "within the device's time")
    parser.add_argument("--no-record", action="store_true",
                        help="do not append to bench/RESULTS.md nor write bench/results/*.json")
    args = parser.parse_args()
    figures: dict = {}
    if args.prepost:
        (report, figures), mode = run_prepost_only(args.runs), "prepost"
    elif args.speedups:
        (report, figures), mode = run_speedups(args.runs), "speedups"
    elif args.cold_start:
        (report, figures), mode = run_cold_start_only(args.runs), "cold-start"
    elif args.startup:
        report, mode = run_startup(args.runs), "startup"
    elif args.cpu:
        (report, figures), mode = run_cpu(args.runs), "cpu"
    elif args.parts:
        report, mode = run_parts(args.runs, args.tiny, args.budget), "parts"
    elif args.shipped:
        (report, figures), mode = run_shipped(args.tiny), "shipped"
    elif args.targets:
        (report, figures), mode = run_targets(args.runs, args.tiny, args.budget), "targets"
    elif args.candidates:
        (report, figures), mode = run_candidates(args.runs, args.tiny), "candidates"
    elif args.every_shape:
        (report, figures), mode = run_every_shape(args.runs, args.tiny, args.budget), "every-shape"
    elif args.compile_only:
        (report, figures), mode = run_compile_only(args.runs, args.budget), "compile-only"
    elif torch.cuda.is_available() or args.tiny:
        (report, figures), mode = run_gpu(args.runs, args.tiny, args.quick, args.budget), "gpu"
    else:
        print("no CUDA GPU here: run with --cpu for the CPU measurements (or --tiny for a smoke test)", file=sys.stderr)
        return 2
    print(report)
    if figures:
        print("\nfigures: " + json.dumps(figures))
    if not args.no_record and not args.tiny:
        record(report, figures, mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
