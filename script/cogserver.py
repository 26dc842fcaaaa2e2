"""Run Cog's own HTTP server (coglet) from this checkout, as the built image does, and talk to it.

Used by script/predict and by the HTTP tests. The server is the real one:
`COG_PREDICT_TYPE_STUB=predict.py:Predictor python -m cog.server.http`, started from the repo root
so that it finds .cog/openapi_schema.json and validates inputs.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The most one request's body may hold, data URIs included: Cog's server answers HTTP 413 "Failed to
# buffer the request body: length limit exceeded" above it. MAX_HTTP_BODY_SIZE in replicate/cog's
# crates/coglet/src/transport/http/routes.rs; tests/test_http.py checks it against the running server.
MAX_BODY_BYTES = 100 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def decode_data_uri(uri: str) -> bytes:
    return base64.b64decode(uri.split(",", 1)[1])


def concurrency_max() -> int:
    """The max of predict.py's @cog.concurrent, as `cog build` reads it (1 without the decorator)."""
    sys.path.insert(0, str(ROOT))
    try:
        import predict
    finally:
        sys.path.remove(str(ROOT))
    return getattr(predict.Predictor.run, "__cog_concurrent_max__", 1)


class CogServer:
    """One server process on 127.0.0.1; `with CogServer(weights) as server: server.predict({...})`."""

    def __init__(self, weights: str | Path | None, log_path: Path, port: int | None = None, env: dict | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.weights = weights
        self.extra_env = env or {}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> CogServer:
        """Launch the server and wait until it is READY."""
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> CogServer:
        """Start the server process; it runs setup while this returns."""
        bin_dir = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),  # the worker runs `python` from PATH
            "PORT": str(self.port),
            "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1" if self.weights else "0"),
            **self.extra_env,
        }
        if self.weights:
            env["COG_WEIGHTS"] = str(self.weights)
        # `cog build` writes ENV COG_MAX_CONCURRENCY=<the @cog.concurrent max> into the image
        # (pkg/image/build.go); a setting given here or in the environment overrides it, as in a container.
        env.setdefault("COG_MAX_CONCURRENCY", str(concurrency_max()))
        self.log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=ROOT,
            env=env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def health(self) -> dict:
        return self.get("/health-check")

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Poll /health-check until READY (the server says BUSY for a moment after each prediction)."""
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the Cog server exited with {self.process.returncode}; see {self.log_path}")
            try:
                last = self.health()
                if last.get("status") == "READY":
                    return last
                if last.get("status") == "SETUP_FAILED":
                    raise RuntimeError(f"setup failed: {last.get('setup', {}).get('logs', '')[-2000:]}")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the Cog server was not READY within {timeout:.0f}s (last: {last}); see {self.log_path}")

    def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None):
        """(status code, parsed JSON body) of one HTTP call."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                return error.code, json.loads(raw)
            except ValueError:
                return error.code, raw.decode(errors="replace")

    def get(self, path: str) -> dict:
        status, body = self.request("GET", path)
        return body

    def predict(self, inputs: dict, headers: dict | None = None, prediction_id: str | None = None):
        """POST /predictions, retrying the server's brief 409 'at capacity' after the previous prediction."""
        body: dict = {"input": inputs}
        if prediction_id:
            body["id"] = prediction_id
        path = f"/predictions/{prediction_id}" if prediction_id else "/predictions"
        method = "PUT" if prediction_id else "POST"
        for _ in range(100):
            status, response = self.request(method, path, body, headers)
            if status != 409:
                return status, response
            time.sleep(0.05)
        return status, response

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log_file.close()
        return self.process.returncode

    def __enter__(self) -> CogServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
