"""A local stand-in for the Hugging Face hub's HTTP API on 127.0.0.1, laid out as the real one is.

Its repositories, revisions and file names come from inpaint/remote-layout.json, a copy of what the
real repositories' public tree listings show (../shared/reference/remote-layout.json), never from the
names the code under test asks for. Each repository answers only at its pinned revision and only for
the names the layout lists; any other name is a 404, as on the real hub, and is recorded in
`unknown` so that a test can fail on it. A file's bytes come from a local folder when it holds the
same name (the tiny test weights), else they are filler (files this project never needs).

Enough of the protocol for huggingface_hub's hf_hub_download and snapshot_download: repo info, the
recursive tree listing, and HEAD/GET on resolve URLs with the commit and ETag headers.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from pathlib import Path

LAYOUT = Path(__file__).resolve().parent.parent / "inpaint" / "remote-layout.json"


def remote_files(entry: dict) -> list[str]:
    """The file names a layout entry lists (its 'known' lists, whatever their exact key)."""
    return sorted({name for key, names in entry.items() if key.startswith("known") for name in names})


class FakeHub:
    def __init__(self, contents: dict[str, Path], layout: Path = LAYOUT) -> None:
        """contents: repository id -> a local folder whose files of the same names are served."""
        described = {repo: entry for repo, entry in json.loads(layout.read_text()).items() if not repo.startswith("_")}
        self.repos: dict[str, tuple[str, dict[str, bytes]]] = {}
        for repo, entry in described.items():
            folder = contents.get(repo)
            files = {}
            for name in remote_files(entry):
                local = folder / name if folder else None
                files[name] = local.read_bytes() if local and local.is_file() else f"filler for {repo}/{name}".encode()
            self.repos[repo] = (entry["revision"], files)
        self.requests: list[str] = []
        self.unknown: list[str] = []  # requests for a file, revision or repository the real hub does not have
        self.hold = lambda path: None  # called with each request's path before it is answered: a slow network
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

            def _missing(self, code: str, what: str, head: bool, count: bool = True):
                if count:
                    hub.unknown.append(what)
                return self._send(404, f"{code}: {what}".encode(), {"X-Error-Code": code}, head)

            def _route(self, head: bool):
                path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                hub.hold(path)
                for repo, (revision, files) in hub.repos.items():
                    for api in (f"/api/models/{repo}/revision/", f"/api/models/{repo}/tree/"):
                        if path.startswith(api):
                            asked = path[len(api):].split("/", 1)[0]
                            if asked != revision:
                                return self._missing("RevisionNotFound", f"{repo}@{asked}", head)
                            if "/tree/" in api:
                                return self._json([
                                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                                    for name, data in files.items()
                                ])
                            return self._json({"id": repo, "sha": revision, "siblings": [{"rfilename": n} for n in files]})
                    prefix = f"/{repo}/resolve/"
                    if path.startswith(prefix):
                        asked, _, relative = path[len(prefix):].partition("/")
                        if asked != revision:
                            return self._missing("RevisionNotFound", f"{repo}@{asked}", head)
                        if relative not in files:
                            return self._missing("EntryNotFound", f"{repo}/{relative}", head)
                        data = files[relative]
                        return self._send(200, data, {
                            "X-Repo-Commit": revision,
                            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                            "Content-Type": "application/octet-stream",
                        }, head)
                if "/resolve/" in path or path.startswith("/api/models/"):
                    return self._missing("RepoNotFound", path, head)
                return self._missing("NotFound", path, head, count=False)  # the client's other calls (e.g. telemetry)

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
