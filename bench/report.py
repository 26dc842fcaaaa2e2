"""How a bench run reports: the machine it ran on, Markdown tables, progress lines, and the record it
leaves (bench/RESULTS.md's history, bench/results/*.json, the current table remade from them)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ROOT = RESULTS.parent.parent


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


def heading(what: str, tiny: bool) -> str:
    """A run's heading in RESULTS.md: what it measured and on which machine; on the tiny weights, that it
    is a smoke test."""
    return f"## {what}{', smoke test on tiny weights (not a measurement)' if tiny else ''}: {machine()}"


def number(text: object) -> float | None:
    """The first number in a table cell ("613", "58.8 dB", "13.7 s (safety ...)"); None if there is none."""
    match = re.search(r"-?\d+(?:\.\d+)?", str(text))
    return float(match.group()) if match else None


def psnr_of(cell: object) -> float | None:
    """The PSNR of an agreement cell ("PSNR 58.8 dB, latents ...", "PSNR inf dB" when equal)."""
    match = re.search(r"PSNR (inf|\d+(?:\.\d+)?) dB", str(cell))
    return float(match.group(1)) if match else None


def by_label(rows: list[list[object]], start: str) -> float | None:
    """The number in the second column of the first row whose label starts with `start`."""
    return next((number(row[1]) for row in rows if str(row[0]).startswith(start)), None)


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
    path.write_text(dumps({"machine": facts, "source": f"bench/RESULTS.md, History: \"{heading}\"", **figures},
                          indent=2) + "\n")
    results_table.update()
    print(f"wrote {path.relative_to(ROOT)}; the current table of {RESULTS.relative_to(ROOT)} remade")


def dumps(value: object, **options) -> str:
    """`value` as JSON that strict parsers (RFC 8259: jq, JavaScript's JSON.parse) read: Python's json writes an
    infinite float as `Infinity`, which is not JSON. A PSNR of two identical pictures is infinite: it is written
    as the number 1e999, which Python and JavaScript read back as infinity and jq as its largest number; NaN,
    which has no such spelling, as null."""
    infinity = "\0inf\0"  # a string no figure holds, put in place of each infinity and then replaced

    def finite(item: object) -> object:
        if isinstance(item, float) and not math.isfinite(item):
            return None if math.isnan(item) else infinity if item > 0 else "-" + infinity
        if isinstance(item, dict):
            return {key: finite(entry) for key, entry in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(entry) for entry in item]
        return item

    text = json.dumps(finite(value), allow_nan=False, **options)
    return text.replace(json.dumps("-" + infinity), "-1e999").replace(json.dumps(infinity), "1e999")


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def progress(text: str) -> None:
    """A line on stderr as soon as a figure exists, so a run cut short still leaves what it measured."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def section(name: str, function, *args, **kwargs):
    """Run one part of the GPU run; a failure is printed with its traceback and the run goes on."""
    try:
        return function(*args, **kwargs)
    except Exception:
        import traceback

        progress(f"{name} FAILED:\n{traceback.format_exc()}")
        return None
