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

--tiny runs a mode's code on the tiny test weights (on whatever device is present), where it would
build full-size ones: a smoke test of this script, not a measurement, and never recorded.

With --targets, --candidates, --every-shape, --shipped: issue 20's figures (targets.py, comparison.py).

This file only chooses a run; the measurements live beside it, one module per concern: workload.py
(weights, inputs, the two pipelines), comparison.py (ours against diffusers' reference), levers.py (each
speed-up alone, torch.compile), targets.py (issue 20's figures), coldstart.py (Cog's server to READY and
through HTTP), cpu.py (what needs no GPU), timeline.py (where GPU time goes) and report.py (the record).

Each run appends its report to bench/RESULTS.md (History), writes its figures to
bench/results/<date>-<time>-<machine>-<mode>.json, and remakes the current table at the top of
RESULTS.md from every run's figures (bench/results_table.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench's modules, whoever runs this

import torch  # noqa: E402

import coldstart  # noqa: E402
import comparison  # noqa: E402
import cpu  # noqa: E402
import levers  # noqa: E402
import report  # noqa: E402
import targets  # noqa: E402


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
    parser.add_argument("--tiny", action="store_true", help="smoke-test the chosen mode on tiny weights (not recorded)")
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
        (markdown, figures), mode = cpu.run_prepost_only(args.runs), "prepost"
    elif args.speedups:
        (markdown, figures), mode = cpu.run_speedups(args.runs), "speedups"
    elif args.cold_start:
        (markdown, figures), mode = coldstart.run_cold_start_only(args.runs, args.tiny), "cold-start"
    elif args.startup:
        markdown, mode = coldstart.run_startup(args.runs, args.tiny), "startup"
    elif args.cpu:
        (markdown, figures), mode = cpu.run_cpu(args.runs, args.tiny), "cpu"
    elif args.parts:
        markdown, mode = levers.run_parts(args.runs, args.tiny, args.budget), "parts"
    elif args.shipped:
        (markdown, figures), mode = targets.run_shipped(args.tiny), "shipped"
    elif args.targets:
        (markdown, figures), mode = targets.run_targets(args.runs, args.tiny, args.budget), "targets"
    elif args.candidates:
        (markdown, figures), mode = targets.run_candidates(args.runs, args.tiny), "candidates"
    elif args.every_shape:
        (markdown, figures), mode = comparison.run_every_shape(args.runs, args.tiny, args.budget), "every-shape"
    elif args.compile_only:
        (markdown, figures), mode = levers.run_compile_only(args.runs, args.budget), "compile-only"
    elif torch.cuda.is_available() or args.tiny:
        (markdown, figures), mode = comparison.run_gpu(args.runs, args.tiny, args.quick, args.budget), "gpu"
    else:
        print("no CUDA GPU here: run with --cpu for the CPU measurements (or --tiny for a smoke test)", file=sys.stderr)
        return 2
    print(markdown)
    if figures:
        print("\nfigures: " + report.dumps(figures))
    if not args.no_record and not args.tiny:
        report.record(markdown, figures, mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
