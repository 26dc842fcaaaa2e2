#!/usr/bin/env python3
"""The current figures at the top of bench/RESULTS.md, made from bench/results/*.json.

Each JSON file is one run: {"machine": {gpu, cpu, python, torch, diffusers, date}, "source": where
its full report is, and figures by key}. A figure's newest value on each kind of machine (the GPU's
name, or "CPU") is current; the table says which run it comes from. `bench/bench.py` writes a file
per run and calls `update`; run this file to remake the table by hand:

  python bench/results_table.py           rewrite the current table in bench/RESULTS.md
  python bench/results_table.py --check   exit 1 if the table is not what the JSON files say
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS_DIR = BENCH / "results"
RESULTS_MD = BENCH / "RESULTS.md"
BEGIN = "<!-- current: made by bench/results_table.py from bench/results/*.json; do not edit by hand -->"
END = "<!-- end of current -->"

# key -> (what it is, unit); the table lists them in this order. All at 50 steps, DPMSolverMultistep,
# guidance 7.5, unless the label says otherwise.
FIGURES = {
    "default_ms": ("GPU time of a 512x512 prediction, default path, steady state (compiled parts in use)", "ms"),
    "saved_parts_ms": ("the same, on a later start that loads the saved compiled parts", "ms"),
    "uncompiled_ms": ("the same, before the compiled parts are taken up (fast path uncompiled)", "ms"),
    "during_compile_ms": ("the same, while the background compile runs", "ms"),
    "reference_ms": ("diffusers' StableDiffusionInpaintPipeline, fp16, SDPA, eager, 512x512", "ms"),
    "shapes_ms": ("other shapes, fast path uncompiled", "ms"),
    "compile_s": ("compiling one part for one working shape", "s"),
    "psnr_db": ("default against the reference (or the uncompiled path), same seed", "dB"),
    "fresh_first_ms": ("the first 512x512 prediction of a fresh server that loads the shipped compiled parts, through HTTP", "ms"),
    "http_e2e_ms": ("a 512x512 prediction at the client, through Cog's HTTP server", "ms"),
    "cold_start_s": ("cold start to READY, weights on local disk", "s"),
    "safety_ms": ("safety checker, one output", "ms"),
    "graphs_gib": ("GPU memory the UNet's CUDA graphs hold after the shapes above (bounded by a budget)", "GiB"),
    "load_s": ("model load on the CPU, full-size weights, fp32", "s"),
    "prepost_ms": ("pre/post-processing of a 4096x4096 upload (decode, mask work, crops, paste, PNG encode)", "ms"),
    "speedups_ms": ("pre/post of a 4096x4096 upload with and without each second code path", "ms"),
    "throughput": ("under load through Cog's server (bench/load.py; the run has its clients and inputs)", ""),
    "test_suite_s": ("the test suite on this project's 2-core CPU machine (tiny random weights)", "s"),
    "concurrency_ips": ("images/s under the same load at each COG_MAX_CONCURRENCY (bench/load.py --concurrency)", ""),
}


# Of a figure whose value is an object, the entries the table shows (others: every number).
SHOWN = {"throughput": ("clients", "max_concurrency", "single_ips", "concurrent_ips", "mean_ms", "p50_ms", "p95_ms", "p99_ms")}


def load_runs(folder: Path = RESULTS_DIR) -> list[dict]:
    """Every run, oldest first (by date, then file name)."""
    runs = []
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        run["file"] = path.name
        runs.append(run)
    return sorted(runs, key=lambda run: (run["machine"]["date"], run["file"]))


def _kind(machine: dict) -> str:
    return machine.get("gpu") or "CPU"


def _value(value) -> str:
    if isinstance(value, list):  # a range over rounds, or the runs of one row
        return "-".join(_value(item) for item in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def render(runs: list[dict]) -> str:
    """The current table: for each kind of machine and each figure, the newest run's value."""
    current: dict[tuple[str, str], dict] = {}
    for run in runs:  # oldest first: newer runs overwrite
        for key in run:
            if key in FIGURES:
                current[_kind(run["machine"]), key] = run
    rows = []
    kinds = sorted({kind for kind, _ in current}, key=lambda kind: (kind == "CPU", kind))
    for kind in kinds:
        for key, (label, unit) in FIGURES.items():
            run = current.get((kind, key))
            if run is None:
                continue
            machine = run["machine"]
            where = f"{kind}, {machine.get('cpu', '?')}; torch {machine.get('torch', '?')}, diffusers {machine.get('diffusers', '?')}"
            value = run[key]
            entries = value.items() if isinstance(value, dict) else [(None, value)]
            entries = [(name, figure) for name, figure in entries if not isinstance(figure, (dict, str))  # the inputs
                       and (key not in SHOWN or name in SHOWN[key])]
            for position, (name, figure) in enumerate(entries):
                text = f"{label}: {name}" if name else label
                note = run.get("notes", {}).get(key, "") if position == 0 else ""
                rows.append(f"| {text} | {_value(figure)} {unit} | {where} | {machine['date']} | "
                            f"`bench/results/{run['file']}`{'; ' + note if note else ''} |")
    header = ("| figure | value | machine | date | run (and what to know) |\n|---|---|---|---|---|")
    return "\n".join([BEGIN, "", header, *rows, "", END])


def update(results_md: Path = RESULTS_MD, folder: Path = RESULTS_DIR) -> bool:
    """Rewrite the current table in place; True if it changed."""
    text = results_md.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + render(load_runs(folder)) + text[end:]
    if new != text:
        results_md.write_text(new)
    return new != text


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check"]:
        text = RESULTS_MD.read_text()
        table = text[text.index(BEGIN) : text.index(END) + len(END)]
        if table != render(load_runs()):
            print("bench/RESULTS.md's current table is out of date: run python bench/results_table.py", file=sys.stderr)
            return 1
        return 0
    print("bench/RESULTS.md updated" if update() else "bench/RESULTS.md already current")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
