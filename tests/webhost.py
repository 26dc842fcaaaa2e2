"""A real HTTP host on loopback for the URL-input tests (conftest's `host` fixture): the routes a hostile or
failing image host would have."""

from __future__ import annotations

import gzip
import http.server
import threading
import time
import urllib.parse

from inpaint.config import Settings

# Loopback is not public: the tests' hosts are reached as a deployment's own networks are, by listing them.
LOOPBACK = Settings(url_allow_networks="127.0.0.0/8").url_networks


class Host:
    """A real HTTP server on loopback (127.0.0.1, or another address of 127/8):
    /photo.png (a photo, with Content-Length); /endless.png (zeros with no length, for all a test needs:
    256 MiB, so that a regression cannot fill the disk, as Cog's own fetch did); /trickle.png (a byte every
    0.2 s); /slow-headers.png (a header line every 0.2 s, for 8 s, before any body); /stall.png (a length of
    1,000 bytes, 10 of them sent, then nothing for 30 s); /bomb.png (Content-Encoding: gzip, 64 KiB that
    inflate to 64 MiB of zeros); /missing.png (404); /moved.png?to=URL (302 to URL); /loop.png (302 to itself); /hangup.png (the
    connection closed, no answer). `served` lists the paths asked for, `agents` their User-Agent headers."""

    def __init__(self, photo: bytes, address: str = "127.0.0.1") -> None:
        served, agents = self.served, self.agents = [], []
        bomb = gzip.compress(bytes(64 << 20), compresslevel=9)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                served.append(self.path)
                agents.append(self.headers.get("User-Agent"))
                target = urllib.parse.urlsplit(self.path)  # a proxy is sent the absolute URL
                try:
                    self._answer(target.path, urllib.parse.parse_qs(target.query))
                except OSError:  # the client hung up
                    pass

            def _answer(self, path, query):
                if path == "/hangup.png":  # closes the connection without a word
                    self.close_connection = True
                    return
                if path == "/missing.png":
                    self.send_error(404)
                    return
                if path in ("/moved.png", "/loop.png"):
                    self.send_response(302)
                    self.send_header("Location", query["to"][0] if path == "/moved.png" else "/loop.png")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                if path == "/slow-headers.png":
                    self.flush_headers()  # the status line, then a header at a time
                    for number in range(40):
                        self.wfile.write(f"X-Slow-{number}: 1\r\n".encode())
                        self.wfile.flush()
                        time.sleep(0.2)
                if path in ("/photo.png", "/bomb.png", "/stall.png", "/slow-headers.png"):
                    body = bomb if path == "/bomb.png" else photo
                    if path == "/bomb.png":
                        self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", str(1000 if path == "/stall.png" else len(body)))
                    self.end_headers()
                    self.wfile.write(body[:10] if path == "/stall.png" else body)
                    self.wfile.flush()
                    if path == "/stall.png":
                        time.sleep(30)
                    return
                self.end_headers()
                for _ in range(256 if path == "/endless.png" else 10**6):
                    self.wfile.write(b"\0" * (1 << 20) if path == "/endless.png" else b"\0")
                    self.wfile.flush()
                    if path == "/trickle.png":
                        time.sleep(0.2)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.url = f"http://{address}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
