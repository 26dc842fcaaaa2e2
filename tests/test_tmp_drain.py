import json, time, threading, http.server
import pytest
from pathlib import Path
from cogserver import CogServer
from test_reliability import _base

class SlowReceiver:
    def __init__(self, delay):
        self.events = []; self.delay = delay
        outer = self
        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if body.get("status") in ("succeeded", "failed", "canceled"):
                    time.sleep(outer.delay)
                outer.events.append((time.monotonic(), body.get("status")))
                self.send_response(200); self.end_headers()
            def log_message(self, *a): pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/webhook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

@pytest.mark.parametrize("delay", [0.0, 3.0])
def test_experiment(tiny_weights, tmp_path, delay):
    tmp = tmp_path / "tmp"; tmp.mkdir()
    rec = SlowReceiver(delay)
    running = CogServer(tiny_weights, log_path=tmp_path / "server.log", env={"TMPDIR": str(tmp)}).start()
    body = {**_base(), "num_inference_steps": 30, "width": 256, "height": 256}
    status, _ = running.request("POST", "/predictions", {"id": "d1", "input": body, "webhook": rec.url}, {"Prefer": "respond-async"})
    assert status == 202
    record = tmp / "inpaint-activity.json"
    t0 = time.monotonic()
    seen_running = False
    while True:
        r = json.loads(record.read_text())
        h = running.health()["status"]
        if r["running"] > 0: seen_running = True
        if seen_running and r["running"] == 0 and h == "READY":
            break
        time.sleep(0.05)
    t_idle = time.monotonic()
    rc = running.stop(timeout=60)
    t_stop = time.monotonic()
    time.sleep(delay + 1)
    print("delay", delay, "idle at", t_idle - t0, "stopped", t_stop - t0, "rc", rc, "events", [(round(t - t0, 2), s) for t, s in rec.events])
    print(Path(tmp_path / "server.log").read_text()[-1500:])
