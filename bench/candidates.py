"""Issue 20, part 4: each candidate timed beside what runs today, on the same inputs, in the same run,
before any of them becomes a code path (a second path is kept only when it wins clearly on the GPU host):

- the text encoder (1x77 tokens) and the safety checker's CLIP vision tower (1x3x224x224) replayed as
  CUDA graphs, against their eager calls;
- the UNet's attention under each SDPA backend (torch.nn.attention.sdpa_kernel), on diffusers' own UNet
  at the 512x512 call shape, against torch's own choice, with each one's output against that choice's;
- where a prediction runs: each model stage's median with every prediction on this thread, on one
  worker thread used again and again (as asyncio.to_thread's pool does in the server), on a new
  thread each time (whether per-thread state explains the stages the server times slower), and on
  this thread while another thread runs Python without a pause (whether a busy thread beside it, taking
  the GIL between the launches of eager stages, could);
- predictions beside the compile worker's loads of a compiled part, free as before and in turns as now
  (inpaint/fastpath/turns.py), when a compiled UNet is in use (--targets, on the shipped parts).

On the CPU the graph rows say why they are not measured; the rest runs (the smoke test's).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch

from timing import median_ms, median_stages

from inpaint.fastpath.compiler import relative_error

PROMPT = "a cat wearing round sunglasses, photo"
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def as_graph(function, device: torch.device):
    """`function` (no arguments, tensors in fixed buffers) recorded once as a CUDA graph; a call replays it
    and returns the output of the recording, which each replay overwrites. Warmed up on a side stream
    first, as torch.cuda.graph's documentation asks."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            function()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = function()

    def replay():
        graph.replay()
        return output

    return replay


def graph_against_eager(function, device: torch.device, calls: int) -> dict[str, object]:
    """Median ms per call of `function` eager and replayed as a CUDA graph, and how far the replay's
    output is from the eager one (0.0: the same kernels gave the same bits)."""
    with torch.inference_mode():
        eager_ms, eager = median_ms(function, device, calls)
        if device.type != "cuda":
            return {"eager_ms": round(eager_ms, 2), "graph_ms": None, "why": "CUDA graphs need a GPU"}
        try:
            replay = as_graph(function, device)
        except RuntimeError as error:  # a candidate that cannot be recorded is a finding, not a failed run
            return {"eager_ms": round(eager_ms, 2), "graph_ms": None, "why": str(error).splitlines()[0][:200]}
        graph_ms, replayed = median_ms(replay, device, calls)
        return {"eager_ms": round(eager_ms, 2), "graph_ms": round(graph_ms, 2),
                "relative_error": relative_error(replayed, eager)}


def text_encoder(pipe, device: torch.device, calls: int) -> dict[str, object]:
    """The text encoder on one prompt's 77 tokens, as each prediction runs it (its last hidden state)."""
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)
    return graph_against_eager(lambda: pipe.text_encoder(ids)[0], device, calls)


def safety_tower(checker, device: torch.device, calls: int) -> dict[str, object]:
    """The safety checker's CLIP vision tower and projection on one 224x224 image: its GPU work (the
    rest compares 20 scores on the host)."""
    model = checker.model
    pixels = torch.rand(1, 3, 224, 224, device=device)
    return graph_against_eager(lambda: model.visual_projection(model.vision_model(pixels)[1]), device, calls)


def sdpa_backends(unet, device: torch.device, dtype: torch.dtype, size: int, calls: int) -> dict[str, object]:
    """ms per call of `unet` (diffusers' own, uncompiled, no graph) at the denoising loop's call shape for
    size x size (batch 2: guidance), under torch's own choice of attention kernel and under each backend
    alone, with each output's relative error against torch's choice; a backend this device or these
    inputs cannot run is given as the reason."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    generator = torch.Generator(device="cpu").manual_seed(0)
    side = size // 8
    sample = torch.randn(2, unet.config.in_channels, side, side, generator=generator).to(device, dtype)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
    timestep = torch.tensor(500, device=device)

    def call():
        return unet(sample, timestep, states, return_dict=False)[0]

    figures: dict[str, object] = {}
    with torch.inference_mode():
        default_ms, default = median_ms(call, device, calls)
        figures["default"] = {"ms": round(default_ms, 2)}
        for name in BACKENDS:
            try:
                with sdpa_kernel([getattr(SDPBackend, name)]):
                    milliseconds, output = median_ms(call, device, calls)
            except RuntimeError as error:  # "No available kernel", say
                figures[name.lower()] = {"ms": None, "why": str(error).splitlines()[0][:200]}
                continue
            figures[name.lower()] = {"ms": round(milliseconds, 2), "relative_error": relative_error(output, default)}
    return figures


def predictor(pipe, fast_path, image, mask, job, wall: bool = False):
    """One prediction as the service makes it, returning each model stage's seconds as pipeline.generate
    times them (and, with `wall`, the whole call's, any wait for a turn included)."""
    from inpaint import pipeline as ours

    empty_prompt = ours.EmptyPrompt()  # as the service holds it

    def predict() -> dict[str, float]:
        seconds: dict[str, float] = {}
        begin = time.perf_counter()
        ours.generate(pipe, [image], [mask], job, timings=seconds, fast=fast_path, empty_prompt=empty_prompt)
        if wall:
            seconds["wall"] = time.perf_counter() - begin
        return seconds

    return predict


def thread_stages(pipe, fast_path, image, mask, job, runs: int) -> dict[str, dict[str, float]]:
    """Each model stage's median (ms) over `runs` predictions (after one untimed), run on this thread, on
    one worker thread again and again, and on a new thread each time; and of one prediction on this thread
    beside a busy one."""
    predict = predictor(pipe, fast_path, image, mask, job)

    def on_new_thread() -> dict[str, float]:
        result: list[dict[str, float]] = []
        thread = threading.Thread(target=lambda: result.append(predict()), name="candidate-fresh")
        thread.start()
        thread.join()
        if not result:
            raise RuntimeError("the prediction on a new thread failed (its traceback is above)")
        return result[0]

    def beside_busy_python() -> dict[str, float]:
        done = threading.Event()

        def spin() -> None:  # pure Python: it holds the GIL until the interpreter makes it yield
            count = 0
            while not done.is_set():
                count += 1

        neighbour = threading.Thread(target=spin, name="candidate-busy", daemon=True)
        neighbour.start()
        try:
            return predict()
        finally:
            done.set()
            neighbour.join()

    figures = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="candidate-pool") as pool:
        for where, run in (("this_thread", predict), ("one_worker_thread", lambda: pool.submit(predict).result()),
                           ("new_thread_each", on_new_thread)):
            run()
            figures[where] = median_stages([run() for _ in range(runs)])
    # One prediction, warm by now: beside a busy thread it may take many times as long (RESULTS), and the
    # device run has minutes, not tens of them.
    figures["beside_a_busy_python_thread"] = median_stages([beside_busy_python()])
    return figures


def beside_loads(pipe, fast_path, image, mask, job, runs: int) -> dict[str, object]:
    """Predictions (each stage's median, and `wall`: the whole call, any wait for a turn included) alone, then
    while another thread loads the UNet's compiled part again and again as the compile worker loads one
    (after READY, the shipped parts at other sizes), freely beside them as before turns.py, and in the
    worker's turns as now; with the loads done meanwhile and one load's median seconds. None when no
    compiled UNet is in use (a fast path uncompiled, or none)."""
    part = fast_path.parts.get("unet") if fast_path is not None else None
    compiled = part.compiled if part is not None else None
    keys = [key for key, source in (compiled.sources if compiled is not None else {}).items() if source != "failed"]
    if not keys:
        return None
    path, predict = compiled.path(keys[0]), predictor(pipe, fast_path, image, mask, job, wall=True)

    def loads(stop: threading.Event, in_turns: bool, seconds: list[float]) -> None:
        while not stop.is_set():
            begin = time.perf_counter()
            with fast_path.compiler.turns.worker() if in_turns else nullcontext():
                compiled.load(path)
            seconds.append(time.perf_counter() - begin)

    figures: dict[str, object] = {}
    predict()
    for where in ("alone", "beside_free_loads", "beside_loads_in_turns"):
        stop, seconds = threading.Event(), []
        loader = None
        if where != "alone":
            loader = threading.Thread(target=loads, args=(stop, where.endswith("turns"), seconds), name="candidate-loads")
            loader.start()
        try:
            figures[where] = median_stages([predict() for _ in range(runs)])
        finally:
            stop.set()
            if loader is not None:
                loader.join()
        if loader is not None:
            figures[where]["loads"] = len(seconds)
            figures[where]["load_ms"] = round(1000 * sorted(seconds)[len(seconds) // 2], 1) if seconds else None
    return figures


def measure(reference, pipe, fast_path, checker, device: torch.device, dtype: torch.dtype, image, mask, job,
            runs: int, calls: int = 20) -> dict[str, object]:
    """Every candidate above: `reference` is diffusers' pipeline (its UNet for the SDPA backends), `pipe` and
    `fast_path` ours as the service runs them, `checker` the SafetyChecker (or None)."""
    size = image.width
    return {
        "text_encoder": text_encoder(pipe, device, calls),
        "safety_tower": safety_tower(checker, device, calls) if checker is not None else None,
        "sdpa_unet_ms": sdpa_backends(reference.unet, device, dtype, size, calls),
        "thread_stages_ms": thread_stages(pipe, fast_path, image, mask, job, runs),
        "beside_loads_ms": beside_loads(pipe, fast_path, image, mask, job, runs),
    }


def report(figures: dict[str, object]) -> str:
    """The candidates as markdown: one table of per-call figures, one of the stages by thread."""

    def cell(value) -> str:
        return "-" if value is None else f"{value:.2f}" if isinstance(value, float) and value >= 0.01 else f"{value:.1e}"

    rows = []
    for name, label in (("text_encoder", "text encoder 1x77"), ("safety_tower", "safety checker's vision tower 1x224x224")):
        entry = figures.get(name)
        if entry is None:
            continue
        rows.append(f"| {label}: eager / CUDA graph | {cell(entry['eager_ms'])} / {cell(entry['graph_ms'])} | "
                    f"{cell(entry.get('relative_error')) if entry['graph_ms'] is not None else entry.get('why', '')} |")
    for backend, entry in figures["sdpa_unet_ms"].items():
        rows.append(f"| UNet call, SDPA {backend} | {cell(entry['ms'])} | "
                    f"{cell(entry['relative_error']) if 'relative_error' in entry else entry.get('why', 'torch chooses')} |")
    lines = ["| candidate | ms per call | relative error, or why not measured |", "|---|---|---|", *rows, ""]
    stages = figures["thread_stages_ms"]
    names = list(next(iter(stages.values())))
    lines += ["| predictions run on | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for where, medians in stages.items():
        lines.append(f"| {where.replace('_', ' ')} | " + " | ".join(f"{medians.get(name, 0):.1f}" for name in names) + " |")
    lines.append("")
    loads = figures.get("beside_loads_ms")
    if not loads:
        lines.append("Predictions beside the worker's loads: not measured (no compiled UNet in use).")
        return "\n".join(lines)
    names = [name for name in loads["alone"] if name not in ("loads", "load_ms")]
    lines += ["| predictions | " + " | ".join(names) + " | loads meanwhile | one load ms, its wait for a turn included |", "|---" * (len(names) + 3) + "|"]
    for where, medians in loads.items():
        lines.append(f"| {where.replace('_', ' ')} | " + " | ".join(f"{medians.get(name, 0):.1f}" for name in names)
                     + f" | {medians.get('loads', '-')} | {medians.get('load_ms') or '-'} |")
    return "\n".join(lines)
