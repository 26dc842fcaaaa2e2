"""The GPU benchmark stays runnable while no GPU is at hand: its smoke test on the tiny weights."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity

ROOT = Path(__file__).resolve().parent.parent


def _strict_json(text: str):
    """`text` parsed as RFC 8259 JSON, as jq or JavaScript's JSON.parse would: NaN and Infinity are Python's
    extensions, not JSON, and are refused."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON (RFC 8259 has no such number)")

    return json.loads(text, parse_constant=refuse)


def _bench(*arguments: str, env: dict[str, str] | None = None) -> tuple[str, dict]:
    """bench/bench.py run as written with `arguments` and --no-record: what it printed, and its figures (what a
    real run writes to bench/results/), once it has exited 0."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), *arguments, "--no-record"],
                         capture_output=True, text=True, timeout=300, env=None if env is None else {**os.environ, **env})
    assert run.returncode == 0, run.stderr[-3000:]
    printed = run.stdout.split("\nfigures: ", 1)
    return run.stdout, _strict_json(printed[1].splitlines()[0]) if len(printed) == 2 else {}


def test_the_timeline_adds_up_the_profiled_events_and_the_gaps_between_them(monkeypatch):
    """bench's GPU timeline (busy time and idle gaps of one prediction), checked on the CPU's own
    profiled operators: a pause between two matrix products is the largest gap."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import timeline

    matrix = torch.randn(256, 256)

    def work():
        matrix @ matrix
        time.sleep(0.03)
        matrix @ matrix

    span, busy, gaps, heaviest = timeline.timeline(work, [ProfilerActivity.CPU], ("cpu_op",))
    assert 0 < busy < span and max(gaps) >= 25
    assert abs(span - busy - sum(gaps)) < 0.01
    assert any("mm" in name for name, _ in heaviest[:3]) and heaviest[0][1] >= heaviest[-1][1]
    assert timeline.gpu_busy(work, torch.device("cpu")) == "GPU timeline: no CUDA"


def test_bench_smoke_test_prints_every_table():
    out, figures = _bench("--tiny", "--runs", "1")
    assert "| shape | reference ms | ours ms | ratio |" in out
    assert "| 64x64 x1 |" in out and "| 128x128 x2 |" in out
    assert "latents rel. err" in out
    assert "Safety checker added time:" in out
    for lever in ("CUDA graphs off", "cudnn.benchmark", "fast path off", "PNDM, timestep read back", "PNDM, host timesteps", "torch.compile"):
        assert lever in out, lever
    assert figures["reference_ms"] > 0 and figures["uncompiled_ms"] > 0 and figures["psnr_db"] > 0
    assert "128x128 x2" in figures["shapes_ms"]


def test_bench_every_shape_smoke_test_times_the_automatic_shapes_beside_the_reference():
    from inpaint import geometry

    out, figures = _bench("--every-shape", "--tiny", "--runs", "1")
    shapes = [f"{width}x{height}" for width, height in geometry.automatic_working_sizes()[:3]]
    assert "| working shape | ours ms | ratio to the reference |" in out
    assert all(f"| {shape} |" in out for shape in shapes)
    assert figures["reference_ms"] > 0 and list(figures["shapes_ms"]) == shapes
    assert all(milliseconds > 0 for milliseconds in figures["shapes_ms"].values())
    assert figures["graphs_gib"] is None and "CUDA graphs kept after them: none recorded" in out  # the CPU


def test_every_shape_begins_no_shape_once_the_runs_budget_is_spent(tiny_weights, monkeypatch):
    """--targets and --every-shape write their figures only at the end, so a device run must end in time:
    past its deadline no shape is begun, and each one left is a row that says so, with no figure."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import comparison

    shapes = [(64, 64), (64, 128)]
    rows, shapes_ms, graph_memory = comparison.every_shape(tiny_weights, torch.device("cpu"), torch.float32, shapes, 2, 1,
                                                       100.0, deadline=time.monotonic())
    assert shapes_ms == {} and graph_memory == ("none recorded", None)
    assert rows == [["64x64", "not measured: the run's --budget was spent", ""],
                    ["64x128", "not measured: the run's --budget was spent", ""]]


def test_a_bake_that_does_not_end_in_its_time_is_stopped_with_its_compile_processes(tiny_weights, tmp_path, monkeypatch):
    """--targets gives the bake half its budget: past that, the bake is stopped, and so is the compile
    process it had started (each watches its parent), and the run goes on without it."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import targets

    folder, scratch = tmp_path / "weights", tmp_path / "tmp"
    shutil.copytree(tiny_weights, folder)  # whatever the stopped bake leaves stays out of the shared weights
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # the bake's compile folder, and so its processes' --out, lie here

    def compiling() -> list[str]:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "inpaint.fastpath.compiler" in text and str(scratch) in text:
                found.append(text)
        return found

    seen, baking = [], threading.Event()

    def watch() -> None:
        while baking.is_set():
            seen.extend(compiling()[:1])
            time.sleep(0.2)

    baking.set()
    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"^the bake did not end within 30 s and was stopped$"):
            targets.bake(folder, 64, timeout=30)  # a compile of the tiny UNet takes minutes here
    finally:
        baking.clear()
        watcher.join()
    assert time.monotonic() - started < 60
    assert seen, "the bake had started no compile process in 30 s"
    deadline = time.monotonic() + 10
    while compiling() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert compiling() == []


def test_bench_targets_smoke_test_ends_within_its_budget_and_writes_every_figure_issue_20_names():
    """The device run's own mode (bench/on-device --targets), on the tiny weights with a budget too short
    for the bake: the bake is stopped at half the budget, the rest is measured uncompiled, each working
    shape is measured or (past the budget) says it was not, and the figures come out under issue 20's keys."""
    from inpaint import geometry

    out, figures = _bench("--targets", "--tiny", "--runs", "1", "--budget", "12")
    assert "No compiled parts: the bake did not end within 6 s and was stopped." in out
    assert "| 64x64 x1 |" in out and "Part 4's candidates" in out
    assert {"reference_ms", "default_ms", "psnr_db", "shapes_ms", "fresh_first_ms", "http_e2e_ms", "cold_start_s"} <= set(figures)
    # ours ran on no compiled part (none baked, and none on the CPU): its figure is not the default's
    assert figures["default_compiled"] == [] and "The compiled parts ours ran on: none" in out
    assert figures["reference_ms"] > 0 and figures["uncompiled_ms"] > 0 and figures["default_ms"] is None
    for width, height in geometry.automatic_working_sizes()[:3]:
        shape = f"{width}x{height}"
        assert (shape in figures["shapes_ms"]) != (f"| {shape} | not measured: the run's --budget was spent |" in out)
    assert figures["fresh_first_ms"] is None and figures["bake_s"] is None  # no bake, so no fresh server on it


@pytest.mark.xdist_group("inductor")  # the bake's compiles, in the worker whose Inductor cache holds its kernels
def test_bench_shipped_smoke_test_bakes_then_serves_the_parts_from_a_fresh_server_at_their_size(inductor_cache):
    """--shipped on the tiny weights: a real bake at 64x64, then a fresh server that has them in its weights,
    pinned, predicting at that size. The server's fast path is off on the CPU: its setup log says so, and the
    figures say that the first prediction ran on no compiled part (on a GPU, the parts it did run on)."""
    out, figures = _bench("--shipped", "--tiny", env={"TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)})
    assert figures["bake_s"] > 0 and figures["cold_start_s"] > 0
    assert figures["fresh_first_ms"] > 0 and figures["fresh_second_ms"] > 0
    assert "first 64x64 prediction through HTTP" in out and "second 64x64 prediction through HTTP" in out
    assert figures["fresh_setup_log"] == ["INFO inpaint.fastpath: compiled parts shipped with the weights not used: "
                                          "the fast path is off (no GPU here, or INPAINT_FAST_PATH=0)"]
    assert figures["fresh_first_compiled"] == [] and "compiled parts in use by the first prediction: none" in out
    why = "the fresh server's first prediction ran on these compiled parts only: none (fresh_setup_log says why)"
    assert figures["notes"] == dict.fromkeys(("fresh_first_ms", "http_e2e_ms", "cold_start_s"), why)


def _named(part: str, shape: tuple[int, ...]) -> str:
    """A compiled part as the log names it ("UNet for latents 2x9x64x64"), made for inputs of `shape`."""
    from inpaint.fastpath import ShapeKey, describe

    return describe(part, ShapeKey.of(torch.zeros(shape)))


def test_the_compiled_parts_a_prediction_ran_on_are_read_from_the_servers_log_and_its_own(monkeypatch):
    """What bench/coldstart.py reads from Cog's server: setup's lines from its log (one JSON object a line, as
    coglet 0.23 writes them) and a prediction's from its response's logs (plain lines)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import coldstart
    from inpaint.fastpath import TAKE_UP

    unet, decoder = _named("unet", (2, 9, 64, 64)), _named("vae.decoder", (1, 4, 64, 64))
    setup = "\n".join(json.dumps({"timestamp": "2026-12-04T18:14:37.376971Z", "level": "INFO", "fields": {
        "message": message, "source": "Stderr"}, "target": "coglet::setup"}) for message in (
        "INFO inpaint.service: setup: weights 0.0 s, model 2.1 s", "INFO inpaint.fastpath: setup took up the 3 shipped "
        "compiled parts at 512x512 in 2.4 s", f"INFO inpaint.fastpath: {TAKE_UP}{unet}"))
    messages = coldstart.server_messages(setup + "\nnot a JSON line")
    assert messages[-1] == "not a JSON line" and messages[0].endswith("model 2.1 s")
    assert coldstart.fast_path_lines(messages) == messages[1:3]
    logs = coldstart.server_messages(f"INFO inpaint.service: seed 1\nINFO inpaint.fastpath: {TAKE_UP}{decoder}\n")
    assert coldstart.compiled_in_use(messages + logs) == [unet, decoder] == ["UNet for latents 2x9x64x64",
                                                                             "VAE decoder for latents 1x4x64x64"]


def test_a_fresh_servers_figures_count_as_the_shipped_parts_only_when_it_ran_on_every_part(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import targets

    unet, decoder = _named("unet", (2, 9, 64, 64)), _named("vae.decoder", (1, 4, 64, 64))
    encoder = _named("vae.encoder", (1, 3, 512, 512))
    assert targets.on_every_part([encoder, unet, decoder]) and not targets.on_every_part([unet, decoder])
    assert targets.fresh_notes({"first_ms": 400.0, "first_compiled": [unet, decoder, encoder]}) == {}
    assert targets.fresh_notes({"first_ms": None}) == {}  # no prediction, no figure to qualify
    assert set(notes := targets.fresh_notes({"first_ms": 600.0, "first_compiled": [unet, decoder]})) == {
        "fresh_first_ms", "http_e2e_ms", "cold_start_s"}
    assert notes["fresh_first_ms"] == ("the fresh server's first prediction ran on these compiled parts only: UNet for "
                                       "latents 2x9x64x64, VAE decoder for latents 1x4x64x64 (fresh_setup_log says why)")


def test_bench_prepost_smoke_test_prints_each_uploads_stages():
    out, figures = _bench("--prepost", "--runs", "1")
    assert "| input | decode | prepare | composite | encode | total |" in out
    assert len(figures["prepost_ms"]) == 5 and all(ms > 0 for ms in figures["prepost_ms"].values())


COLD_STARTS = ("first start (no verified stamp: sha256 of every file), page cache warm",
               "later start, page cache cold (weight files evicted)", "later start, page cache warm")


def _seconds(out: str, label: str) -> float:
    """The seconds a printed table gives `label`: its row must hold a number and nothing else."""
    (cell,) = re.findall(rf"^\| {re.escape(label)} \| ([^|]*) \|$", out, re.M)
    return float(cell.removesuffix(" s"))


def test_bench_cold_start_smoke_test_times_each_start_through_the_server(tmp_path):
    out, figures = _bench("--cold-start", "--tiny", "--runs", "1", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert out.startswith("## Cold start only, smoke test on tiny weights (not a measurement): ")
    assert all(_seconds(out, start) > 0 for start in COLD_STARTS)
    assert figures == {"cold_start_s": _seconds(out, COLD_STARTS[-1])}


def test_bench_startup_smoke_test_times_each_fresh_interpreter_and_the_cold_starts(tmp_path):
    out, _ = _bench("--startup", "--tiny", "--runs", "1", env={"XDG_CACHE_HOME": str(tmp_path)})
    for label in ("python -c pass (the interpreter and its site-packages' .pth files)", "python -c 'import torch'",
                  "python -c 'import predict' (cog, inpaint's light modules)",
                  "... + the modules setup imports (diffusers, transformers, inpaint.service)", *COLD_STARTS):
        assert _seconds(out, label) > 0, label
    assert "| ... + CUDA context | not measured (no CUDA here) |" in out  # the CPU
    assert re.search(r"^\| self time of the imports by package .* \| torch \d+\.\d\d s, .*\(all: \d+\.\d s\) \|$", out, re.M)


def test_bench_cpu_smoke_test_prints_every_table_and_its_figures(tmp_path):
    out, figures = _bench("--cpu", "--tiny", "--runs", "1", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert "| unet/diffusion_pytorch_model.fp16.safetensors | " in out and "| 1,731,933,536 | False |" in out
    loads = ("ours, first start (sha256 of every file, then load; checker included)",
             "ours, later starts (verified stamp; checker included)",
             "ours, later starts, checker off (the same work as the next line)",
             "diffusers from_pretrained (no checker, no verification)")
    assert all(_seconds(out, load) > 0 for load in loads)
    assert "| 1 output(s) |" in out and "| 4 output(s) |" in out
    assert all(_seconds(out, start) > 0 for start in COLD_STARTS)
    assert figures["load_s"] == _seconds(out, loads[1]) and figures["cold_start_s"] == _seconds(out, COLD_STARTS[-1])
    assert len(figures["prepost_ms"]) == 5 and all(ms > 0 for ms in figures["prepost_ms"].values())
    assert figures["safety_ms"] > 0


def test_each_prepost_speed_up_is_timed_against_its_plain_alternative(monkeypatch):
    """bench --speedups swaps the product's second code paths (stamped distances, the strip PNG writer)
    for their plain alternatives by patching them: each variant must still run a whole prediction."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import cpu

    rows = cpu.bench_speedups(runs=1, rounds=1)
    variants = ("as built", "distances by transform only", "PNG by Pillow, level 6", "PNG by Pillow, level 1")
    assert [row[0].split(": ", 1)[1] for row in rows] == list(variants) * 3
    assert all(float(row[1]) > 0 for row in rows)
    assert all(row[2] == "1.00" for row in rows if row[0].endswith(": as built"))


def test_bench_parts_smoke_test_prints_each_combination():
    out, _ = _bench("--parts", "--tiny", "--runs", "1")
    for parts in ("the default", "+ channels_last VAE", "+ fused QKV", "UNet contiguous", "CUDA graphs off"):
        assert f"| {parts}" in out and "| 128x128 |" in out, parts


def test_requirements_only_env_holds_the_images_packages_and_runs_the_model(tmp_path):
    built = subprocess.run([sys.executable, str(ROOT / "bench" / "requirements-only-env"), str(tmp_path / "env")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    python = tmp_path / "env" / "bin" / "python"
    listed = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(sorted({d.metadata['Name'].lower() for d in m.distributions()}))"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    names = listed.stdout
    for wanted in ("'torch'", "'diffusers'", "'transformers'", "'isal'", "'imagecodecs'", "'cog'", "'coglet'", "'structlog'"):
        assert wanted in names, wanted
    for test_tool in ("'pytest'", "'hypothesis'", "'schemathesis'", "'jsonschema'"):  # requirements-dev.txt only
        assert test_tool not in names, test_tool
    imported = subprocess.run([str(python), "-c", "import predict, inpaint.service, cog.server.http"],
                              capture_output=True, text=True, timeout=300, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert imported.returncode == 0, imported.stderr[-3000:]


@pytest.mark.slow
def test_the_device_run_works_with_the_lent_machines_packages(tmp_path):
    """bench/on-device --targets, rehearsed here as a device run starts it: in a venv of the lent machine's
    packages (bench/device-env, from the device tool's list), with the wheels bench/device-wheels downloads
    carried beside them; tiny weights, and a budget too short for the bake. An import the machine's
    packages cannot satisfy fails here, not in a device run's scarce minutes."""
    env = tmp_path / "device-env"
    for command in ([sys.executable, str(ROOT / "bench" / "device-env"), str(env)],
                    ["bash", str(ROOT / "bench" / "device-wheels"), str(tmp_path / "wheels")]):
        made = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert made.returncode == 0, made.stderr[-3000:]
    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run(["bash", "bench/on-device", "--targets", "--tiny", "--runs", "1", "--budget", "12"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT,
                         env={**os.environ, "PYTHON": str(env / "bin" / "python"), "OUT": str(out),
                              "WHEELS": str(tmp_path / "wheels")})
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    # The carried wheels are what runs (the project's pins), beside the machine's own hub.
    pins = dict(line.split("==") for name in ("requirements.txt", "requirements-dev.txt")
                for line in (ROOT / name).read_text().splitlines() if "==" in line and not line.startswith("#"))
    machine = dict(line.split("==") for line in (ROOT / "bench" / "device-packages.txt").read_text().splitlines()
                   if "==" in line and not line.startswith("#"))
    assert (f"diffusers {pins['diffusers']} transformers {pins['transformers']} hub {machine['huggingface-hub']} "
            f"cog {pins['cog']}") in run.stdout
    assert "figures: {" in (out / "bench.log").read_text() and list((out / "results").glob("*.json"))
    tests = (out / "tests.log").read_text()
    summaries = [line for line in tests.splitlines() if re.search(r"^=* ?\d+ (passed|skipped|failed|error).* in [\d.]+s", line)]
    assert len(summaries) == 3 and not any("failed" in line or "error" in line for line in summaries), tests[-3000:]


def test_figures_are_written_as_json_a_strict_parser_reads(monkeypatch):
    """Python's json writes an infinite float as `Infinity`, which jq and JavaScript refuse; the PSNR of two
    identical pictures is infinite (on the CPU, where the fast path is off, ours and diffusers' are)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import report

    figures = {"psnr_db": float("inf"), "shapes_ms": {"64x64 x1": [1.5, 2.0]}, "worst": -float("inf"),
               "ratio": float("nan"), "label": "Infinity \0inf\0", "nested": [float("inf"), None]}
    text = report.dumps(figures, indent=2)
    parsed = _strict_json(text)
    assert parsed == {**figures, "ratio": None}  # 1e999 reads back as infinity; NaN has no JSON number, so null
    assert parsed["psnr_db"] == float("inf") and parsed["worst"] == -float("inf") and parsed["label"] == figures["label"]
    assert '"psnr_db": 1e999' in text


def test_results_md_starts_with_the_current_table_of_the_json_runs():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "results_table.py"), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for path in (ROOT / "bench" / "results").glob("*.json"):
        facts = _strict_json(path.read_text())["machine"]
        assert {"gpu", "cpu", "torch", "diffusers", "date"} <= facts.keys(), path.name


def test_the_current_table_takes_each_figures_newest_run_on_each_kind_of_machine(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import results_table

    machine = {"gpu": "GPU X", "cpu": "c", "torch": "t", "diffusers": "d"}
    runs = {
        "a.json": {"machine": {**machine, "date": "2026-01-01"}, "default_ms": 500, "psnr_db": 40.0},
        "b.json": {"machine": {**machine, "date": "2026-02-01"}, "default_ms": 400},
        "c.json": {"machine": {**machine, "gpu": None, "date": "2026-03-01"}, "prepost_ms": {"JPEG in": [90, 100]}},
    }
    for name, run in runs.items():
        (tmp_path / name).write_text(json.dumps(run))
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# Results\n\n{results_table.BEGIN}\n{results_table.END}\n\n## History\nold\n")
    assert results_table.update(md, tmp_path) and not results_table.update(md, tmp_path)
    text = md.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| figure")]
    assert len(rows) == 3 and text.endswith("## History\nold\n")
    assert "| 400 ms | GPU X" in rows[0] and "`bench/results/b.json`" in rows[0]  # the newer run's default
    assert "| 40 dB | GPU X" in rows[1] and "a.json" in rows[1]  # only the older run has it
    assert ": JPEG in | 90-100 ms | CPU" in rows[2]


def test_load_bench_smoke_run_through_the_real_server_writes_the_throughput_object(tiny_weights, tmp_path):
    """bench/load.py as a user runs it, on the tiny weights: single client, then 3 clients closed loop,
    then Poisson arrivals; each prints its figures and writes `throughput` into the run JSON given."""
    into = tmp_path / "run.json"
    into.write_text(json.dumps({"machine": {"gpu": None}, "default_ms": 1.0}))
    for arrivals in (["--clients", "3"], ["--arrivals", "poisson", "--rate", "6"]):
        run = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "load.py"), "--weights", str(tiny_weights), *arrivals,
             "--seconds", "4", "--size", "64", "--steps", "2", "--warm-up", "1", "--into", str(into),
             "--log", str(tmp_path / "server.log")],
            capture_output=True, text=True, timeout=300,
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        for figure in ("single_ips", "concurrent_ips", "p50_ms", "p95_ms", "p99_ms"):
            assert f"| {figure} |" in run.stdout
        written = _strict_json(into.read_text())
        throughput = written["throughput"]
        assert written["default_ms"] == 1.0  # the run's other figures are kept
        assert {"clients", "single_ips", "concurrent_ips", "p50_ms", "p95_ms", "p99_ms"} <= set(throughput)
        assert throughput["single_ips"] > 0 and throughput["concurrent_ips"] > 0 and throughput["failed"] == 0
        assert 0 < throughput["p50_ms"] <= throughput["p95_ms"] <= throughput["p99_ms"]
        assert throughput["predictions"] >= 3
        assert throughput["single_p50_ms"] > 0 and "http_e2e_ms" not in written  # 64x64 at 2 steps is not its setting
        stages = throughput["single_stages_ms"]  # the server's own metrics.timings, per stage
        assert {"decode", "text_encode", "vae_encode", "denoise", "vae_decode", "safety", "encode"} <= set(stages)
        assert all(ms >= 0 for ms in stages.values()) and stages["denoise"] > 0
        assert "each stage's median as the server timed it" in run.stdout


def test_a_fresh_server_is_timed_to_ready_and_through_each_prediction_with_the_servers_stages(tiny_weights, monkeypatch):
    """bench's fresh-server run, as --targets makes cold_start_s, fresh_first_ms, http_e2e_ms and the
    server's stage medians beside them (http_stages_ms); on the tiny weights at 64x64, 20 steps (py-spy samples
    the three after the first for long enough to name the thread that holds the GIL most)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import coldstart

    figures: dict = {}
    text = coldstart.cold_start(tiny_weights, predict=True, figures=figures, repeats=3, size=64, steps=20)
    assert set(figures) == {"ready_s", "setup_fast_path", "first_ms", "first_compiled", "second_ms", "steady_ms",
                            "steady_stages_ms", "steady_gil"}, text
    assert figures["setup_fast_path"] == figures["first_compiled"] == []  # the fast path is off on the CPU
    assert "compiled parts in use by the first prediction: none" in text
    assert "first 64x64 prediction through HTTP" in text and "second 64x64 prediction through HTTP" in text
    assert "the median of the 3 after the first" in text and "each stage's median" in text
    assert figures["ready_s"] > 0 and figures["first_ms"] > 0 and figures["steady_ms"] > 0
    stages = figures["steady_stages_ms"]  # the server's own metrics.timings, in ms
    assert {"decode", "text_encode", "vae_encode", "denoise", "vae_decode", "safety", "encode"} <= set(stages)
    assert 0 < stages["denoise"] < figures["steady_ms"]
    # py-spy (requirements-dev.txt) sampled the server's worker: the predictions ran on asyncio's own pool
    # (asyncio.to_thread), whose threads Python names asyncio_N, and that thread held the GIL the most.
    holders = figures["steady_gil"]
    assert set(holders) == {"seconds", "held", "by_thread"}, holders
    assert 0 < holders["held"] <= 1 and holders["seconds"] > 0
    assert next(iter(holders["by_thread"])).startswith("asyncio_"), holders
    assert "during them the GIL was held in" in text and "by: asyncio_" in text


def test_the_gil_sampler_names_the_thread_that_holds_the_gil_in_another_process(monkeypatch):
    """bench/gil.py with py-spy on a real process: one thread runs Python without a pause while the main
    thread sleeps, so that thread holds the GIL in nearly every sample, and it is named."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gil

    code = ("import threading, time\n"
            "def spin():\n    while True: pass\n"
            "threading.Thread(target=spin, name='spinner', daemon=True).start()\n"
            "print('ready', flush=True)\ntime.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        with gil.GilSampler(process.pid) as sampler:
            time.sleep(2)
    finally:
        process.kill()
        process.wait()
    figures = sampler.figures()
    assert figures["seconds"] >= 2 and figures["held"] > 0.5, figures
    assert list(figures["by_thread"]) == ["spinner"], figures
    assert sampler.text().endswith("by: spinner 100%")
    assert gil.GilSampler(None).__enter__().figures() == {"error": "no process to sample"}


def test_our_stage_medians_in_process_are_the_model_stages_the_server_reports(inpainter, monkeypatch):
    """--targets' default_stages_ms: the same stage names as the server's model stages, to set beside them."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import targets

    stages = targets.our_stages(inpainter.pipe, inpainter.fast, 64, 2, 3)
    assert set(stages) == {"text_encode", "vae_encode", "denoise", "vae_decode"}
    assert all(ms > 0 for ms in stages.values())


def test_part_4s_candidates_are_each_timed_beside_what_runs_today(inpainter, tiny_weights, monkeypatch):
    """bench/candidates.py on the tiny model, on the CPU: the text encoder and the checker's tower timed
    eager, their CUDA graph rows saying why they are not measured here; diffusers' UNet under torch's
    own attention kernel and under each SDPA backend, each timed with its output's distance from torch's
    choice or refused with torch's own reason; and the model stages with predictions on this thread, on
    one worker thread and on a new thread each."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import workload
    import candidates
    import report

    cpu = torch.device("cpu")
    reference = workload.load_reference(tiny_weights, cpu, torch.float32)
    image, mask = workload.inputs(64)
    figures = candidates.measure(reference, inpainter.pipe, inpainter.fast, inpainter.safety, cpu, torch.float32, image,
                                 mask, workload.job(1, 2), runs=2, calls=3)
    for name in ("text_encoder", "safety_tower"):
        assert figures[name] == {"eager_ms": figures[name]["eager_ms"], "graph_ms": None, "why": "CUDA graphs need a GPU"}
        assert figures[name]["eager_ms"] > 0
    sdpa = figures["sdpa_unet_ms"]
    assert list(sdpa) == ["default", "flash_attention", "efficient_attention", "cudnn_attention", "math"]
    assert sdpa["default"]["ms"] > 0 and 0 < sdpa["math"]["ms"] and sdpa["math"]["relative_error"] < 1e-4
    refused = [entry for entry in sdpa.values() if entry["ms"] is None]
    assert refused and all("No viable backend" in entry["why"] for entry in refused)  # torch's words on the CPU
    assert all(entry["relative_error"] < 1e-4 for entry in sdpa.values() if entry.get("ms") and "relative_error" in entry)
    stages = figures["thread_stages_ms"]
    assert list(stages) == ["this_thread", "one_worker_thread", "new_thread_each", "beside_a_busy_python_thread"]
    for medians in stages.values():
        assert set(medians) == {"text_encode", "vae_encode", "denoise", "vae_decode"} and all(ms > 0 for ms in medians.values())
    text = candidates.report(figures)
    assert "| text encoder 1x77: eager / CUDA graph |" in text and "| CUDA graphs need a GPU |" in text
    assert "| UNet call, SDPA math |" in text and "| new thread each |" in text and "| beside a busy python thread |" in text
    assert figures["beside_loads_ms"] is None  # the fast path is off on the CPU: no compiled UNet to load
    assert "Predictions beside the worker's loads: not measured (no compiled UNet in use)." in text
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("candidate-")]  # none left running
    assert _strict_json(report.dumps(figures)) == figures  # as bench/results/*.json holds it


def test_bench_candidates_smoke_test_prints_its_tables_and_figures():
    out, figures = _bench("--candidates", "--tiny", "--runs", "1")
    assert "| candidate | ms per call | relative error, or why not measured |" in out
    assert "| predictions run on | denoise | text_encode | vae_decode | vae_encode |" in out
    assert set(figures["candidates"]) == {"text_encoder", "safety_tower", "sdpa_unet_ms", "thread_stages_ms", "beside_loads_ms"}


def test_load_bench_records_http_e2e_ms_only_in_the_setting_issue_20_names(monkeypatch):
    """One client's median, for a 512x512 photo at 512x512, 50 steps, on a server it started, the checker on."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import load

    throughput = {"single_p50_ms": 412.5}
    setting = load.make_parser().parse_args(["--weights", "w"])  # the defaults: 512x512, 50 steps
    assert (setting.size, setting.photo_size, setting.steps) == (512, None, 50)
    assert load.http_e2e_ms(throughput, setting) == 412.5
    for other in (["--url", "http://127.0.0.1:5000"], ["--weights", "w", "--size", "768"],
                  ["--weights", "w", "--photo-size", "4096"], ["--weights", "w", "--steps", "25"]):
        assert load.http_e2e_ms(throughput, load.make_parser().parse_args(other)) is None, other
    monkeypatch.setenv("INPAINT_SAFETY_CHECKER", "0")
    assert load.http_e2e_ms(throughput, setting) is None
