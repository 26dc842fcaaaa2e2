"""A local stand-in for the Hugging Face hub's HTTP API, serving folders from disk on 127.0.0.1.

Enough of the protocol for huggingface_hub's snapshot_download and hf_hub_download: repo info,
the recursive tree listing, and HEAD/GET on resolve URLs with the commit and ETag headers.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, value):
                self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

            def _route(self, head: bool):
                path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                for repo, folder in hub.repos.items():
                    files = sorted(p for p in folder.rglob("*") if p.is_file())
                    if path.startswith(f"/api/models/{repo}/revision/"):
                        siblings = [{"rfilename": p.relative_to(folder).as_posix()} for p in files]
                        return self._json({"id": repo, "sha": COMMIT, "siblings": siblings})
                    if path.startswith(f"/api/models/{repo}/tree/"):
                        return self._json([
                            {"type": "file", "path": p.relative_to(folder).as_posix(), "size": p.stat().st_size,
                             "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                            for p in files
                        ])
                    prefix = f"/{repo}/resolve/"
                    if path.startswith(prefix):
                        relative = path[len(prefix):].split("/", 1)[1]
                        target = folder / relative
                        if not target.is_file():
                            return self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"}, head)
                        data = target.read_bytes()
                        return self._send(200, data, {
                            "X-Repo-Commit": COMMIT,
                            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                            "Content-Type": "application/octet-stream",
                        }, head)
                return self._send(404, b"not found", {"X-Error-Code": "RepoNotFound"}, head)

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
