"""What needs no GPU: load time of the full-size weights (ours against from_pretrained), the pre- and
post-processing of 4096x4096 uploads (and each second code path against its plain alternative), and the
safety checker's added time on the CPU."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imagecodecs
import numpy as np
import torch
from PIL import Image, ImageDraw

import coldstart
import report
import workload
from fullsize import size_report
from workload import CACHE, ROOT

from inpaint.weights import manifest_pin


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
    coldstart.forget_verification()
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


def _photo_4096_16bit(path: Path, png: Path) -> Path:
    """The 4096x4096 photo as a 16-bit PNG: its 8 bits as the high byte, noise as the low byte (a camera's
    low bits are noise, and compress as badly)."""
    if not path.is_file():
        high = np.asarray(Image.open(png).convert("RGB")).astype(np.uint16) << 8
        low = np.random.default_rng(0).integers(0, 256, high.shape, dtype=np.uint16)
        path.write_bytes(imagecodecs.png_encode(high | low, level=6))
    return path


def _prepost_files() -> tuple[Path, Path, Path, Path, Path, Path]:
    """The 4096x4096 photo (PNG, JPEG and 16-bit PNG) and masks (800x600 ellipse, 3500x3500, brush strokes) of
    the pre/post rows."""
    CACHE.mkdir(exist_ok=True)
    png = _photo_4096(CACHE / "photo-4096.png")
    jpeg = CACHE / "photo-4096.jpg"
    if not jpeg.is_file():
        Image.open(png).save(jpeg, quality=92)
    deep = _photo_4096_16bit(CACHE / "photo-4096-16bit.png", png)
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
    return png, jpeg, deep, small, large, strokes


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
    tiny = workload.weights(True, torch.device("cpu"))
    inpainter = Inpainter.load(str(tiny), Settings(device="cpu", weights_manifest_sha256=manifest_pin(tiny)))
    png, jpeg, deep, small, large, strokes = _prepost_files()
    stages = ("decode", "prepare", "composite", "encode")
    rows = []
    for label, photo, mask_path in (
        ("PNG in, PNG out, 800x600 mask", png, small),
        ("16-bit PNG in, 16-bit PNG out, 800x600 mask", deep, small),
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

    tiny = workload.weights(True, torch.device("cpu"))
    inpainter = Inpainter.load(str(tiny), Settings(device="cpu", weights_manifest_sha256=manifest_pin(tiny)))
    _prepost_files()
    uploads = {
        "JPEG, 800x600 mask": (CACHE / "photo-4096.jpg", CACHE / "mask-4096.png"),
        "PNG, 800x600 mask": (CACHE / "photo-4096.png", CACHE / "mask-4096.png"),
        "JPEG, 12 brush strokes": (CACHE / "photo-4096.jpg", CACHE / "mask-4096-strokes.png"),
    }

    def pillow_png(level: int):
        def write(pixels, path, map=map, strip_rows=None, icc_profile=None):  # _write_png's signature
            profile = {} if icc_profile is None else {"icc_profile": icc_profile}  # Pillow needs no map or strips
            Image.fromarray(pixels).save(path, format="PNG", compress_level=level, **profile)
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
    markdown = (f"## Pre/post speed-ups against their plain alternatives: {report.machine()}\n\n4096x4096 uploads, a prediction's "
              f"wall time less the model's own stages (decode, mask work, crops, paste, encode), ms, median of {runs} runs in each of 3 rounds (ratio to as "
              f"built; over 1: the plain alternative is slower):\n\n" + report.table(["upload: variant", "ms", "ratio"], rows))
    return markdown, {"speedups_ms": {row[0]: report.number(row[1]) for row in rows}}


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


def run_prepost_only(runs: int) -> tuple[str, dict]:
    rows = bench_prepost(runs)
    return f"## Pre/post only: {report.machine()}\n\n" + report.table(
        ["input", "decode", "prepare", "composite", "encode", "total"], rows
    ), {"prepost_ms": {row[0]: report.number(row[-1]) for row in rows}}


def run_cpu(runs: int, tiny: bool = False) -> tuple[str, dict]:
    torch.set_num_threads(os.cpu_count() or 1)
    folder = workload.weights(tiny, torch.device("cpu"))
    sections = [report.heading("CPU run", tiny)]
    sections.append(f"{'Tiny' if tiny else 'Full-size'} random weights (fp16 safetensors) against the published sizes:\n\n" + report.table(
        ["file", "bytes", "published", "same"],
        [[name, f"{ours:,}", f"{published:,}" if published else "-", ours == published] for name, ours, published in size_report(folder)],
    ))
    load = bench_load(folder, runs)
    sections.append(f"Load time to a ready model on the CPU (fp32), seconds, median of {runs} fresh processes:\n\n"
                    + report.table(["loader", "seconds"], load))
    prepost = bench_prepost(runs)
    sections.append(f"Pre/post-processing of a 4096x4096 photo (Inpainter.inpaint's own stage "
                    f"timings, model stages left out), ms, median of {runs}:\n\n"
                    + report.table(["input", "decode", "prepare", "composite", "encode", "total"], prepost))
    safety = bench_safety(folder, runs)
    sections.append(f"Safety checker ({'tiny' if tiny else 'full-size ViT-L/14'}, fp32 on the CPU), ms, median of {runs}:\n\n"
                    + report.table(["batch", "ms", "ms per output"], safety))
    starts = coldstart.bench_cold_starts(folder, runs)
    sections.append(coldstart.cold_start_section(folder, runs, starts, tiny))
    return "\n\n".join(sections), {
        "load_s": report.by_label(load, "ours, later starts (verified stamp; checker included)"),
        "prepost_ms": {row[0]: report.number(row[-1]) for row in prepost},
        "safety_ms": report.by_label(safety, "1 output"),
        "cold_start_s": report.by_label(starts, "later start, page cache warm"),
    }
