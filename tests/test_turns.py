"""Turns between predictions and the compile worker's work in the server's process (fastpath/turns.py)."""

import contextlib
import random
import threading
import time
from types import SimpleNamespace

from inpaint.fastpath.turns import Turns


def _spans() -> tuple[list, threading.Lock]:
    return [], threading.Lock()


def _hold(context, label: str, seconds: float, spans: list, lock: threading.Lock) -> None:
    with context:
        start = time.monotonic()
        time.sleep(seconds)
        end = time.monotonic()
    with lock:
        spans.append((label, start, end))


def test_the_worker_waits_for_a_running_prediction_and_then_for_its_grace():
    turns, (spans, lock) = Turns(grace=0.3, patience=10), _spans()
    prediction = threading.Thread(target=_hold, args=(turns.prediction(), "prediction", 0.3, spans, lock))
    prediction.start()
    time.sleep(0.05)
    _hold(turns.worker(), "worker", 0.01, spans, lock)
    prediction.join()
    (_, _, predicted), (_, started, _) = sorted(spans, key=lambda span: span[0] != "prediction")
    assert started - predicted >= 0.3  # quiet for its grace after the prediction ended
    assert started - predicted < 1.0


def test_with_no_prediction_the_workers_pieces_follow_each_other_at_once():
    turns = Turns(grace=5, patience=10)
    started = time.monotonic()
    for _ in range(3):  # setup's loads of the shipped parts, say
        with turns.worker():
            pass
    assert time.monotonic() - started < 0.5


def test_a_prediction_that_arrives_during_a_piece_of_work_waits_for_that_piece_alone():
    turns, (spans, lock) = Turns(grace=0.05, patience=10), _spans()
    worker = threading.Thread(target=_hold, args=(turns.worker(), "worker", 0.4, spans, lock))
    worker.start()
    time.sleep(0.1)
    asked = time.monotonic()
    _hold(turns.prediction(), "prediction", 0.01, spans, lock)
    worker.join()
    (_, _, worked), (_, started, _) = sorted(spans, key=lambda span: span[0] != "worker")
    assert worked <= started < worked + 0.2  # right after the piece, not before it
    assert started - asked < 0.5


def test_back_to_back_predictions_keep_the_worker_waiting_until_its_patience_then_it_goes_next():
    """Two clients with no gap between their predictions: the worker is never quiet for its grace,
    so after its patience it takes the turn after the running prediction, and the clients go on after it."""
    turns, (spans, lock) = Turns(grace=0.2, patience=0.6), _spans()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            _hold(turns.prediction(), "prediction", 0.05, spans, lock)

    clients = [threading.Thread(target=client) for _ in range(2)]
    for thread in clients:
        thread.start()
    time.sleep(0.1)
    asked = time.monotonic()
    _hold(turns.worker(), "worker", 0.05, spans, lock)
    time.sleep(0.3)
    stop.set()
    for thread in clients:
        thread.join()
    (_, started, ended), = [span for span in spans if span[0] == "worker"]
    assert 0.6 <= started - asked < 0.6 + 0.3  # its patience, then at most the prediction running then
    assert any(span[1] >= ended for span in spans if span[0] == "prediction")  # predictions went on after it
    assert sum(1 for span in spans if span[0] == "prediction" and span[2] <= started) >= 6  # and ran before it


def test_never_two_holders_at_once():
    turns, (spans, lock) = Turns(grace=0.01, patience=0.2), _spans()
    chooser = random.Random(7)
    plan = [("prediction" if chooser.random() < 0.7 else "worker", chooser.uniform(0.005, 0.03)) for _ in range(40)]
    threads = [threading.Thread(target=_hold, args=(turns.prediction() if kind == "prediction" else turns.worker(),
                                                    kind, seconds, spans, lock)) for kind, seconds in plan]
    for thread in threads:
        thread.start()
        time.sleep(chooser.uniform(0, 0.01))
    for thread in threads:
        thread.join()
    assert len(spans) == len(plan)
    ordered = sorted(spans, key=lambda span: span[1])
    for (_, _, end), (_, start, _) in zip(ordered, ordered[1:]):
        assert start >= end


def test_between_waits_for_the_running_prediction_without_taking_a_turn():
    turns, (spans, lock) = Turns(grace=5, patience=10), _spans()
    prediction = threading.Thread(target=_hold, args=(turns.prediction(), "prediction", 0.3, spans, lock))
    prediction.start()
    time.sleep(0.05)
    turns.between()
    returned = time.monotonic()
    prediction.join()
    assert returned >= spans[0][2]
    started = time.monotonic()
    with turns.prediction():  # between() took no turn: a prediction goes at once
        assert time.monotonic() - started < 0.5


def _held_off(turn, asked, label: str, inside=lambda: None, grace: float = 0.0) -> None:
    """While `turn` is held (entered here, `inside` run in it), a thread asking for `asked` starts only after it
    ends (and `grace` more seconds)."""
    spans, lock = _spans()
    with turn:
        inside()
        other = threading.Thread(target=_hold, args=(asked, label, 0.01, spans, lock))
        other.start()
        time.sleep(0.2)
        assert spans == []  # still waiting
        left = time.monotonic()
    other.join(5)
    assert spans and spans[0][1] >= left + grace


def _fast_path_with_a_part():
    """A FastPath as installed with a compile worker (no part compiled yet), its worker's grace short."""
    from inpaint.fastpath import FastPath

    fast = FastPath(True, compile="background")
    fast.parts = {"unet": SimpleNamespace(compiled=None)}
    fast.compiler.turns.grace = 0.05
    return fast


def test_a_fast_paths_prediction_holds_a_turn_that_the_compile_worker_waits_for():
    """FastPath.prediction() is a prediction's turn: a piece of the worker's work (on its Compiler's turns)
    starts only after it, and its grace."""
    fast = _fast_path_with_a_part()
    _held_off(fast.prediction(), fast.compiler.turns.worker(), "worker", grace=0.05)


def test_a_prediction_within_its_threads_own_turn_takes_no_second_one():
    """The service holds a request's whole turn (FastPath.turn) around each generation's own
    (FastPath.prediction): the inner one goes at once, and the worker waits for the outer one."""
    turns = Turns(grace=0.05, patience=10)

    def inner() -> None:
        started = time.monotonic()
        with turns.prediction():
            assert time.monotonic() - started < 0.1

    _held_off(turns.prediction(), turns.worker(), "worker", inside=inner)  # the inner turn's end did not end it


def test_another_threads_prediction_waits_for_the_turn_held():
    turns = Turns(grace=0.05, patience=10)
    _held_off(turns.prediction(), turns.prediction(), "prediction")


def test_a_fast_paths_turn_covers_its_predictions_and_is_nothing_on_the_cpu():
    """FastPath.turn(), which the service holds over a request's whole turn on the device (its generations
    and the safety check): the worker waits for it, a prediction inside it goes at once; with the fast path
    off (the CPU's), it is no turn at all."""
    from inpaint.fastpath import FastPath

    fast = _fast_path_with_a_part()

    def generation() -> None:
        with fast.prediction():
            pass

    _held_off(fast.turn(), fast.compiler.turns.worker(), "worker", inside=generation)
    off = FastPath(False)
    assert off.compiler is None and isinstance(off.turn(), contextlib.nullcontext)


def _request(turn, outcome: list[str]) -> threading.Thread:
    """A request's thread, started: it holds `turn` (a prediction's), then notes "ran", or what its check raised."""
    def request() -> None:
        try:
            with turn:
                outcome.append("ran")
        except RuntimeError as error:
            outcome.append(str(error))

    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    return thread


def test_a_cancelled_prediction_leaves_the_line_while_the_worker_holds_the_turn():
    """A request cancelled while it waits behind a piece of the worker's work: its check raises, it leaves
    at once, and the worker's next piece is not kept waiting for it."""
    turns = Turns(grace=0.05, patience=10)
    cancelled, outcome = threading.Event(), []

    def check() -> None:
        if cancelled.is_set():
            raise RuntimeError("the prediction was cancelled")

    with turns.worker():
        waiting = _request(turns.prediction(check), outcome)
        time.sleep(0.2)
        cancelled.set()
        waiting.join(1)
        assert outcome == ["the prediction was cancelled"]
    started = time.monotonic()
    with turns.worker():  # no prediction waits, none has run: at once
        assert time.monotonic() - started < 0.2


def test_a_fast_paths_turn_calls_the_requests_check_while_it_waits():
    """FastPath.turn(check), as the service holds it: a request cancelled while the worker holds the turn leaves."""
    fast, outcome = _fast_path_with_a_part(), []

    def check() -> None:
        raise RuntimeError("the prediction was cancelled")

    with fast.compiler.turns.worker():
        _request(fast.turn(check), outcome).join(5)
        assert outcome == ["the prediction was cancelled"]


def test_each_prediction_waiting_behind_the_worker_counts_so_one_leaving_keeps_the_next_piece_behind_the_other():
    """Two requests wait behind a piece of the worker's work and one is cancelled: the other still holds
    its place, so it runs before the worker's next piece, which is asked for as the first one ends."""
    turns, order = Turns(grace=0.05, patience=10), []
    cancelled = threading.Event()

    def check() -> None:
        if cancelled.is_set():
            raise RuntimeError("the prediction was cancelled")

    def request(label: str, check=None) -> None:
        with contextlib.suppress(RuntimeError), turns.prediction(check):
            order.append(label)
            time.sleep(0.05)

    with turns.worker():
        leaving = threading.Thread(target=request, args=("cancelled", check))
        staying = threading.Thread(target=request, args=("waiting",))
        leaving.start()
        staying.start()
        time.sleep(0.2)
        cancelled.set()
        leaving.join(1)
    with turns.worker():  # at once: the waiting request's turn comes first all the same
        order.append("worker")
    staying.join(1)
    assert order == ["waiting", "worker"]
