#!/usr/bin/env python3
"""Throughput and latency under load, through Cog's real HTTP server, as clients see them.

Runs one client in a closed loop (single_ips), then K clients, each posting its next prediction as
soon as its last one is back (closed loop), or predictions arriving at random (Poisson, --rate per
second) from as many clients as it takes. A 409 ("At capacity") is retried after a short wait, as
the README tells clients to; latency is from the first attempt to the answer, so waits count. Prints
images/s and p50/p95/p99 latency, and writes the `throughput` object
{clients, single_ips, concurrent_ips, p50_ms, p95_ms, p99_ms, ...}: into the run JSON given with
--into (a GPU run's bench/results/*.json), else into a new bench/results/ file with a RESULTS.md
History section (--no-record: print only).

  bench/load.py --weights weights --clients 4 --seconds 60         a server started here (real weights)
  bench/load.py --url http://127.0.0.1:5000 --clients 4             a server already running
  bench/load.py --weights DIR --arrivals poisson --rate 3
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "script"))
sys.path.insert(0, str(ROOT / "bench"))

from cogserver import CogServer, concurrency_max  # noqa: E402
from timing import median_stages  # noqa: E402

RETRY_409_SECONDS = 0.02


def _photo_and_mask(size: int) -> tuple[str, str]:
    """A textured photo of size x size and a mask of its middle third, as PNG data URIs."""
    import base64

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([(x * 255 // size), (y * 255 // size), ((x + y) * 127 // size)], -1)
    pixels = (pixels + rng.integers(0, 24, pixels.shape)).clip(0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 3 : 2 * size // 3, size // 3 : 2 * size // 3] = 255

    def uri(image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    return uri(Image.fromarray(pixels)), uri(Image.fromarray(mask))


class Load:
    """Predictions against one server, and what each cost."""

    def __init__(self, server: CogServer, body: dict) -> None:
        self.server = server
        self.body = body
        self.lock = threading.Lock()
        self.latencies: list[float] = []  # seconds, first attempt to answer, successful predictions
        self.finished: list[float] = []  # monotonic time of each success
        self.failed: list[str] = []
        self.stages: list[dict[str, float]] = []  # the server's own timings of each success, seconds per stage
        self.refused = 0  # 409s retried
        self.seed = 0

    def one(self, started: float | None = None) -> None:
        started = started or time.monotonic()
        with self.lock:
            self.seed += 1
            body = {**self.body, "seed": self.seed}
        while True:
            status, response = self.server.request("POST", "/predictions", {"input": body})
            if status != 409:
                break
            with self.lock:
                self.refused += 1
            time.sleep(RETRY_409_SECONDS)
        done = time.monotonic()
        with self.lock:
            if status == 200 and response.get("status") == "succeeded":
                self.latencies.append(done - started)
                self.finished.append(done)
                self.stages.append(response.get("metrics", {}).get("timings", {}))
            else:
                self.failed.append(f"{status}: {response.get('error') if isinstance(response, dict) else response}")

    def closed_loop(self, clients: int, seconds: float) -> float:
        """K clients for `seconds`; returns the wall time from the start to the last answer."""
        start = time.monotonic()
        deadline = start + seconds

        def client():
            while time.monotonic() < deadline:
                self.one()

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.monotonic() - start

    def poisson(self, rate: float, seconds: float) -> float:
        """Arrivals at `rate` per second for `seconds`, each from its own client; wall time to the last answer."""
        start = time.monotonic()
        arrivals = random.Random(1)
        threads, at = [], start
        while True:
            at += arrivals.expovariate(rate)
            if at > start + seconds:
                break
            time.sleep(max(0.0, at - time.monotonic()))
            thread = threading.Thread(target=self.one, args=(at,))
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
        return time.monotonic() - start


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))]  # nearest rank


def measure(server: CogServer, body: dict, clients: int, seconds: float, arrivals: str, rate: float | None,
            warm_up: int) -> dict:
    warm = Load(server, body)
    for _ in range(warm_up):
        warm.one()
    if warm.failed:
        raise SystemExit(f"warm-up prediction failed: {warm.failed[0]}")
    single = Load(server, body)
    single_wall = single.closed_loop(1, seconds)
    single_ips = len(single.latencies) / single_wall
    loaded = Load(server, body)
    if arrivals == "poisson":
        wall = loaded.poisson(rate or clients * single_ips, seconds)
    else:
        wall = loaded.closed_loop(clients, seconds)
    if not loaded.latencies:
        raise SystemExit(f"no prediction succeeded under load: {loaded.failed[:3]}")
    concurrent_ips = len(loaded.latencies) / wall
    milliseconds = [latency * 1000 for latency in loaded.latencies]
    return {
        "clients": clients,
        "arrivals": arrivals if arrivals == "closed" else f"poisson {rate or clients * single_ips:.3g}/s",
        "seconds": seconds,
        "single_ips": round(single_ips, 4),
        "concurrent_ips": round(concurrent_ips, 4),
        "speedup": round(concurrent_ips / single_ips, 3),
        "single_mean_ms": round(statistics.mean(single.latencies) * 1000, 1),
        "single_p50_ms": round(statistics.median(single.latencies) * 1000, 1),
        "single_stages_ms": median_stages(single.stages),
        "mean_ms": round(statistics.mean(milliseconds), 1),
        "p50_ms": round(_percentile(milliseconds, 0.50), 1),
        "p95_ms": round(_percentile(milliseconds, 0.95), 1),
        "p99_ms": round(_percentile(milliseconds, 0.99), 1),
        "predictions": len(loaded.latencies),
        "failed": len(loaded.failed) + len(single.failed),
        "refused_409": loaded.refused,
        "inputs": {key: value for key, value in body.items() if key not in ("image", "mask")},
    }


def report(throughput: dict, machine: str = "") -> str:
    lines = [
        f"### Load through Cog's server: {machine}",
        "",
        f"{throughput['clients']} clients ({throughput['arrivals']}), {throughput['seconds']:.0f} s each, "
        f"{throughput['inputs']}, photo {throughput.get('photo_size')} px, "
        f"COG_MAX_CONCURRENCY {throughput.get('max_concurrency', 'default')}:",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for key in ("single_ips", "concurrent_ips", "speedup", "single_mean_ms", "single_p50_ms", "mean_ms", "p50_ms", "p95_ms", "p99_ms",
                "predictions", "failed", "refused_409"):
        lines.append(f"| {key} | {throughput[key]} |")
    stages = throughput.get("single_stages_ms")
    if stages:
        lines += ["", "One client, each stage's median as the server timed it, ms: "
                  + ", ".join(f"{stage} {ms:g}" for stage, ms in stages.items())]
    return "\n".join(lines)


def compare(runs: dict) -> str:
    """One row per COG_MAX_CONCURRENCY measured, the same clients each time."""
    lines = ["| COG_MAX_CONCURRENCY | images/s | mean ms | p50 ms | p95 ms | p99 ms | 409s retried |", "|---|---|---|---|---|---|---|"]
    for slots, run in runs.items():
        lines.append(f"| {slots} | {run['concurrent_ips']} | {run['mean_ms']} | {run['p50_ms']} | {run['p95_ms']} | "
                     f"{run['p99_ms']} | {run['refused_409']} |")
    return "\n".join(lines)


def http_e2e_ms(throughput: dict, args: argparse.Namespace) -> float | None:
    """One client's median at the client, when the run is in the setting issue 20's http_e2e_ms names:
    a 512x512 photo at 512x512, 50 steps, on a server started here with the safety checker on (a --url
    server's setting is unknown); else None."""
    from inpaint.config import Settings

    setting = (args.weights and args.size == 512 and (args.photo_size or args.size) == 512 and args.steps == 50
               and Settings.from_env().safety_checker)
    return throughput["single_p50_ms"] if setting else None


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server")
    where.add_argument("--weights", help="start a server here on these weights (a folder)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0, help="for the single client, then again under load")
    parser.add_argument("--arrivals", choices=["closed", "poisson"], default="closed")
    parser.add_argument("--rate", type=float, help="Poisson arrivals per second (default: clients x single_ips)")
    parser.add_argument("--size", type=int, default=512, help="the working size (width and height)")
    parser.add_argument("--photo-size", type=int, help="the photo's side (default: --size); larger means more pixel work")
    parser.add_argument("--concurrency", default="",
                        help="COG_MAX_CONCURRENCY of a server started here (default: the image's); several, comma-separated "
                             "(1,2,3): a server and a measurement each, compared in one table")
    parser.add_argument("--note", default="", help="what to know about this run, kept beside its figures")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warm-up", type=int, default=3)
    parser.add_argument("--into", type=Path, help="add the throughput object to this run JSON")
    parser.add_argument("--no-record", action="store_true", help="print only")
    parser.add_argument("--log", type=Path, default=Path("/tmp/inpaint-load-server.log"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)

    image, mask = _photo_and_mask(args.photo_size or args.size)
    body = {"image": image, "mask": mask, "width": args.size, "height": args.size, "num_inference_steps": args.steps,
            "scheduler": "DPMSolverMultistep", "guidance_scale": 7.5, "prompt": "a red brick wall"}
    settings = [int(value) for value in args.concurrency.split(",") if value] or [None]
    if args.url and settings != [None]:
        parser.error("--concurrency starts its own servers: give --weights, not --url")
    runs = {}
    for slots in settings:
        if args.url:
            server = CogServer(None, log_path=args.log)
            server.url = args.url.rstrip("/")
            context = nullcontext(server)
        else:
            context = CogServer(args.weights, log_path=args.log, env={"COG_MAX_CONCURRENCY": str(slots)} if slots else {})
        with context as server:
            runs[slots] = measure(server, body, args.clients, args.seconds, args.arrivals, args.rate, args.warm_up)
        runs[slots]["photo_size"] = args.photo_size or args.size
        if slots or not args.url:
            runs[slots]["max_concurrency"] = slots or concurrency_max()  # a server started here: the image's default
    throughput = runs[concurrency_max() if concurrency_max() in runs else settings[-1]]
    from report import dumps, machine, record  # the bench's own record of a run

    e2e = http_e2e_ms(throughput, args)

    text = report(throughput, machine())
    if len(runs) > 1:
        text += "\n\n" + compare(runs)
    print(text)
    if args.into:
        run = json.loads(args.into.read_text()) if args.into.exists() else {}
        run["throughput"] = throughput
        if e2e is not None:
            run["http_e2e_ms"] = e2e
        if args.note:
            run.setdefault("notes", {})["throughput"] = args.note
        args.into.write_text(dumps(run, indent=2) + "\n")
        print(f"wrote the throughput object into {args.into}")
    elif not args.no_record:
        figures = {"throughput": throughput, "http_e2e_ms": e2e, "notes": {"throughput": args.note} if args.note else None}
        if len(runs) > 1:
            figures["concurrency_ips"] = {f"COG_MAX_CONCURRENCY={slots}": run["concurrent_ips"] for slots, run in runs.items()}
        record(text + (f"\n\n{args.note}" if args.note else ""), figures, "load")
    return 1 if any(run["failed"] for run in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
