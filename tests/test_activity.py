"""inpaint/activity.py: the predictions in run() as the probes read them, and when BUSY means lost slots.
Through Cog's real server and the manifests' probe commands: tests/test_deploy.py."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from inpaint.activity import QUIET_SECONDS, Activity, activity_file, in_progress, slots_lost


def test_each_prediction_counts_itself_in_and_out_of_the_record_whatever_its_outcome(tmp_path):
    record = tmp_path / "activity.json"
    activity = Activity(record)
    assert json.loads(record.read_text())["running"] == 0
    with activity.prediction():
        with activity.prediction():
            assert json.loads(record.read_text())["running"] == 2
        with pytest.raises(RuntimeError), activity.prediction():
            raise RuntimeError("a failed prediction")
        assert json.loads(record.read_text())["running"] == 1
    assert json.loads(record.read_text())["running"] == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["activity.json"]  # no partial file left


def test_the_record_says_when_its_count_last_changed(tmp_path):
    record = tmp_path / "activity.json"
    activity = Activity(record)
    with activity.prediction():
        pass
    changed = json.loads(record.read_text())["changed"]
    assert abs(changed - time.time()) < 5
    assert slots_lost("BUSY", record, 60, now=changed + 59) == "" and slots_lost("BUSY", record, 60, now=changed + 60)


@pytest.mark.parametrize("removed_before", [False, True])
def test_the_record_goes_with_its_process(tmp_path, removed_before):
    """Also quietly when something else removed it first (a cleaned temporary folder)."""
    import subprocess
    import sys

    record = tmp_path / "activity.json"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r}); from pathlib import Path; "
            f"from inpaint.activity import Activity; activity = Activity(Path({str(record)!r})); "
            f"assert activity.file.exists(); {'activity.file.unlink()' if removed_before else ''}")
    done = subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True)
    assert not record.exists() and done.stderr == ""


@pytest.mark.parametrize("removed_before", [False, True])
def test_the_record_goes_with_its_activity(tmp_path, monkeypatch, removed_before):
    """In process, as above at exit (mutation testing sees only this one)."""
    import gc
    import sys

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # where an error of a finalizer goes
    record = tmp_path / "activity.json"
    activity = Activity(record)
    if removed_before:
        record.unlink()
    del activity
    gc.collect()
    assert not record.exists() and unraisable == []


def test_predictions_on_many_threads_leave_the_last_count_in_the_record(tmp_path):
    record = tmp_path / "activity.json"
    activity = Activity(record)
    inside = threading.Barrier(8)

    def predict() -> None:
        with activity.prediction():
            inside.wait(10)  # all eight in at once
            assert json.loads(record.read_text())["running"] == 8
            inside.wait(10)  # and none out before each has read the record

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(predict) for _ in range(8)]:
            future.result()
    assert json.loads(record.read_text())["running"] == 0


def test_the_record_is_in_the_temporary_folder_the_server_and_its_probes_share(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again, as a new process does
    assert activity_file() == tmp_path / "inpaint-activity.json"
    assert Activity().file == tmp_path / "inpaint-activity.json" and activity_file().exists()


def test_slots_are_lost_only_when_busy_with_no_prediction_in_run_for_the_whole_wait(tmp_path):
    record = tmp_path / "activity.json"
    record.write_text(json.dumps({"running": 0, "changed": 1000.0}))
    assert slots_lost("BUSY", record, 60, now=1060.0) == (
        "status BUSY, but no prediction has been in run() for 60 s: Cog's server has lost its prediction slots "
        "(coglet 0.23.1, a request id over 255 bytes or with a NUL; docs/serving.md), and only a restart frees them")
    assert slots_lost("BUSY", record, 60)  # now, by the clock
    assert slots_lost("BUSY", record, 60, now=1059.9) == ""  # not yet
    for status in ("READY", "STARTING", "UNHEALTHY"):  # the probes judge those by the status alone
        assert slots_lost(status, record, 60, now=5000.0) == ""
    record.write_text(json.dumps({"running": 1, "changed": 1000.0}))
    assert slots_lost("BUSY", record, 60, now=5000.0) == ""  # busy with a long prediction: serving


@pytest.mark.parametrize("content", [None, "", "{", "[]", '{"running": 0}', '{"running": "x", "changed": 0}'])
def test_no_record_or_one_that_cannot_be_read_makes_no_judgement(tmp_path, content):
    """A server without the record (an image from before it), or a file that is not one: the probes go by the
    status alone, as before."""
    record = tmp_path / "activity.json"
    if content is not None:
        record.write_text(content)
    assert slots_lost("BUSY", record, 0, now=10**10) == ""


def test_a_stopping_server_has_left_what_is_in_run_and_what_ended_a_moment_ago(tmp_path):
    """The preStop hook's question (script/probe drain): is anything left that SIGTERM would drop?"""
    record = tmp_path / "activity.json"
    record.write_text(json.dumps({"running": 2, "changed": 1000.0}))
    for status in ("READY", "BUSY"):
        assert in_progress(status, record, 2, now=9000.0) == "2 predictions in run()"
    record.write_text(json.dumps({"running": 1, "changed": 1000.0}))
    assert in_progress("READY", record, 2, now=9000.0) == "1 prediction in run()"
    record.write_text(json.dumps({"running": 0, "changed": 1000.0}))
    assert in_progress("READY", record, 2, now=1001.5) == (
        "no prediction in run() for only 1.5 s: the last one's output and webhook may be on their way")
    assert in_progress("READY", record, 2, now=999.0).startswith("no prediction in run() for only 0.0 s:")  # clock skew
    assert in_progress("READY", record, 2, now=1002.0) == ""
    assert in_progress("BUSY", record, 2, now=1002.0) == ""  # BUSY with nothing in run(): lost slots, nothing to finish
    record.write_text(json.dumps({"running": 0, "changed": time.time()}))
    assert in_progress("READY", record)  # now, by the clock: a record written just now is within the default quiet
    record.write_text(json.dumps({"running": 0, "changed": time.time() - 2 * QUIET_SECONDS}))
    assert in_progress("READY", record) == ""


@pytest.mark.parametrize("status", ["STARTING", "SETUP_FAILED", "DEFUNCT", "UNHEALTHY", ""])
def test_a_server_not_serving_has_nothing_to_finish(tmp_path, status):
    """A stale count (a worker that died in run()) holds nothing up: no prediction of it can end now."""
    record = tmp_path / "activity.json"
    record.write_text(json.dumps({"running": 3, "changed": time.time()}))
    assert in_progress(status, record, 2) == ""


@pytest.mark.parametrize("content", [None, "{", '{"changed": 0}', '{"running": 1, "changed": "soon"}'])
def test_no_record_that_can_be_read_holds_a_stop_up(tmp_path, content):
    record = tmp_path / "activity.json"
    if content is not None:
        record.write_text(content)
    assert in_progress("READY", record, 2, now=10.0) == ""
