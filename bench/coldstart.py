"""Cold starts: process start to READY through Cog's real server (first start, page cache cold and
warm), the first predictions through HTTP, and where a cold start's seconds go (imports, CUDA context)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gil
import report
import workload
from timing import median_stages
from workload import ROOT

from inpaint.fastpath import TAKE_UP
from inpaint.pipeline import pick_device
from inpaint.weights import cache_root, manifest_pin


def forget_verification() -> None:
    """The next start hashes every file again, as a first start does."""
    shutil.rmtree(cache_root() / "verified", ignore_errors=True)


def _evict_page_cache(folder: Path) -> None:
    """Drop the weight files from the page cache (a cold disk, as after a machine boots)."""
    for path in folder.rglob("*.safetensors"):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def server_messages(text: str) -> list[str]:
    """The messages of a Cog server's log (coglet writes one JSON object per line, the message in its fields;
    a prediction's own logs, as its response holds them, are plain lines)."""
    messages = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            messages.append(line)
            continue
        fields = entry.get("fields") if isinstance(entry, dict) else None
        messages.append(str(fields.get("message", "")) if isinstance(fields, dict) else line)
    return messages


def fast_path_lines(messages: list[str]) -> list[str]:
    """The fast path's own log lines (its loggers, inpaint.fastpath and below) among a server's messages."""
    return [message for message in messages if message.partition(" ")[2].startswith("inpaint.fastpath")]


def compiled_in_use(messages: list[str]) -> list[str]:
    """The compiled parts these log lines say a prediction took up ("UNet for latents 2x9x64x64", ...)."""
    return [message.split(TAKE_UP, 1)[1].strip() for message in messages if TAKE_UP in message]


def cold_start(folder: Path, predict: bool = False, env: dict[str, str] | None = None,
                figures: dict | None = None, repeats: int = 1, size: int = 512, steps: int = 50) -> str:
    """Seconds from starting Cog's server to READY (needs cog installed), with the sha256 stamp in place,
    and where setup spent them (its own log line). With `predict`, also the first `size`x`size`
    prediction through HTTP and `repeats` more: wall time at the client and the first two's own stage
    timings. `figures`, if given, receives ready_s, setup_fast_path (the fast path's log lines in setup:
    what it did with compiled parts shipped with the weights), first_ms, second_ms, first_compiled (the
    compiled parts in use by the first prediction: taken up in setup's warm-up or by it), and, of the
    repeats, steady_ms (the median at the client), steady_stages_ms (each stage's median as the server
    timed it) and steady_gil (which of the server worker's threads held the GIL meanwhile: bench/gil.py)."""
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
        messages = server_messages(log.read_text(errors="replace"))
        setup = [message for message in messages if message.startswith("INFO inpaint.service: setup: ")]
        if setup:
            text += f"; the server's log: `{setup[-1].split('setup: ', 1)[1]}`"
        figures["setup_fast_path"] = fast_path_lines(messages)
        if figures["setup_fast_path"]:
            text += "; the fast path in setup: " + " / ".join(f"`{line}`" for line in figures["setup_fast_path"])
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
            if number == 1:
                figures["first_compiled"] = compiled_in_use(messages + server_messages(response.get("logs") or ""))
            return True

        if run(1):
            with gil.GilSampler(gil.worker(server.process.pid)) as holders:  # who else takes the GIL meanwhile
                all(run(number) for number in range(2, 2 + repeats))
            figures["steady_gil"] = holders.figures()
        for attempt, (milliseconds, timings) in zip(("first", "second"), done):
            figures[f"{attempt}_ms"] = round(milliseconds, 1)
            stages = ", ".join(f"{k} {1000 * v:.0f}" for k, v in timings.items())
            text += f"; {attempt} {size}x{size} prediction through HTTP {milliseconds:.0f} ms (stages, ms: {stages}{beside})"
        if "first_compiled" in figures:
            text += f"; compiled parts in use by the first prediction: {', '.join(figures['first_compiled']) or 'none'}"
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
            text = cold_start(folder)
            report.progress(f"cold start, {label}: {text}")
            try:
                seconds[label].append(float(text.split(" s", 1)[0]))
            except ValueError:  # not measured, or failed: the text says why
                return [[label, text]]
    return [[label, f"{statistics.median(values):.1f}"] for label, values in seconds.items()]


def cold_start_section(folder: Path, runs: int, rows: list[list[object]] | None = None, tiny: bool = False) -> str:
    where = f"on {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "on the CPU (fp32)"
    rows = bench_cold_starts(folder, runs) if rows is None else rows
    return (f"Cold start {where}, process start to READY through Cog's server ({'tiny' if tiny else 'full-size'} weights, safety "
            f"checker included), seconds, median of {runs}:\n\n" + report.table(["start", "seconds"], rows))


def run_cold_start_only(runs: int, tiny: bool = False) -> tuple[str, dict]:
    folder = workload.weights(tiny, pick_device()[0])
    rows = bench_cold_starts(folder, runs)
    return report.heading("Cold start only", tiny) + "\n\n" + cold_start_section(folder, runs, rows, tiny), {
        "cold_start_s": report.by_label(rows, "later start, page cache warm")}


def _startup_imports() -> list[list[object]]:
    """Fresh interpreters doing part of a cold start's work, timed, and the import time by package."""
    rows = []
    for label, code in (
        ("python -c pass (the interpreter and its site-packages' .pth files)", "pass"),
        ("python -c 'import torch'", "import torch"),
        ("... + CUDA context", "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
         if torch.cuda.is_available() else None),
        ("python -c 'import predict' (cog, inpaint's light modules)", "import predict"),
        ("... + the modules setup imports (diffusers, transformers, inpaint.service)", "import predict, inpaint.service"),
    ):
        if code is None:
            rows.append([label, "not measured (no CUDA here)"])
            continue
        begin = time.monotonic()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
        rows.append([label, f"{time.monotonic() - begin:.2f} s"])
        report.progress("startup: " + " | ".join(rows[-1]))
    rows.append(["self time of the imports by package (python -X importtime, top 10)", _import_time_by_package()])
    report.progress("startup: " + " | ".join(rows[-1]))
    return rows


def run_startup(runs: int, tiny: bool = False) -> str:
    """--startup: where a cold start goes in this interpreter's environment (run it again under
    bench/requirements-only-env's interpreter for the image's package set alone)."""
    import importlib.metadata

    folder = workload.weights(tiny, pick_device()[0])
    rows = _startup_imports()
    installed = len({dist.metadata["Name"].lower() for dist in importlib.metadata.distributions()})
    return (report.heading("Cold start breakdown", tiny) + f"\n\nInterpreter `{sys.executable}`, {installed} distributions "
            "installed. Fresh processes, page cache warm:\n\n" + report.table(["what", "time"], rows)
            + "\n\n" + cold_start_section(folder, runs, tiny=tiny))


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
            rows.append([label, cold_start(folder, env=env)])
        report.progress("startup: " + " | ".join(rows[-1]))
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
