"""A real https server on 127.0.0.1 for the COG_WEIGHTS tests (conftest's `https` fixture), and tars of folders."""

from __future__ import annotations

import http.server
import io
import ssl
import subprocess
import tarfile
import threading
from collections.abc import Iterable
from pathlib import Path


class HttpsServer:
    """A real https server on 127.0.0.1 with a certificate made here (openssl), which clients trust
    through SSL_CERT_FILE, as a deployment trusts its own CA. Routes: path -> (status, headers, body);
    a body that is not bytes is an iterable of chunks, sent without a length until it ends or the client
    hangs up (`sent` counts the bytes that went out)."""

    def __init__(self, folder: Path) -> None:
        self.cert, key = folder / "cert.pem", folder / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(self.cert),
             "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True,
        )
        self.routes: dict[str, tuple[int, dict, bytes | Iterable[bytes]]] = {}
        self.requests: list[str] = []
        self.sent = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                status, headers, body = server.routes.get(self.path.split("?")[0], (404, {}, b"not found"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                chunks = [body] if isinstance(body, bytes) else body
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for chunk in chunks:
                        self.wfile.write(chunk)
                        server.sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError):
                    pass  # the client hung up, as the tests of refused downloads expect

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def tar_of(folder: Path, arcname: str = "checkpoint", mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        tar.add(folder, arcname=arcname)
    return buffer.getvalue()
