"""An HTTP server on 127.0.0.1 in front of the moto S3 server that injects network faults.

Requests are forwarded to moto unchanged unless a fault matches them:

- ``cut``: send the status line, headers (with the full ``Content-Length``) and half of the body,
  then close the connection;
- ``close``: close the connection without answering;
- ``stall``: wait ``seconds`` without answering, then close;
- ``stall-body``: send the headers and half of the body, wait ``seconds``, then close;
- ``status``: answer with ``status`` and an S3 error document (``code``) instead of forwarding.

Each fault applies to the next ``times`` requests with its method whose path contains ``key``.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlparse

Action = Literal["cut", "close", "stall", "stall-body", "status"]

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass
class Fault:
    """One fault waiting for the requests it matches."""

    method: str
    action: Action
    key: str
    times: int
    seconds: float = 0.0
    status: int = 500
    code: str = "InternalError"


class FaultyS3Proxy:
    """A threaded HTTP proxy to ``upstream`` that records requests and applies faults."""

    def __init__(self, upstream: str) -> None:
        u = urlparse(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.requests: list[tuple[str, str]] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The proxy's endpoint URL."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(
        self,
        method: str,
        action: Action,
        *,
        key: str = "",
        times: int = 1,
        seconds: float = 0.0,
        status: int = 500,
        code: str = "InternalError",
    ) -> None:
        """Apply ``action`` to the next ``times`` ``method`` requests whose path contains ``key``."""
        with self._lock:
            self._faults.append(Fault(method, action, key, times, seconds, status, code))

    def count(self, method: str, key: str = "") -> int:
        """How many ``method`` requests whose path contains ``key`` arrived."""
        with self._lock:
            return sum(1 for m, path in self.requests if m == method and key in path)

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            for fault in self._faults:
                if fault.method == method and fault.key in path and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _hang_up(self) -> None:
                self.close_connection = True
                try:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                    kept = [(k, v) for k, v in r.getheaders() if k.lower() not in _HOP_BY_HOP]
                    return r.status, kept, data
                finally:
                    conn.close()

            def _send_head(self, status: int, headers: list[tuple[str, str]], length: int) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def _serve(self) -> None:
                body = self._body()
                fault = proxy._take(self.command, self.path)
                action = fault.action if fault else None
                if fault is not None and action == "close":
                    self._hang_up()
                    return
                if fault is not None and action == "stall":
                    time.sleep(fault.seconds)
                    self._hang_up()
                    return
                if fault is not None and action == "status":
                    doc = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{fault.code}</Code>'
                        f"<Message>injected</Message></Error>"
                    ).encode()
                    self._send_head(fault.status, [("Content-Type", "application/xml")], len(doc))
                    if self.command != "HEAD":
                        self.wfile.write(doc)
                    return
                status, headers, data = self._forward(body)
                if fault is not None and action in ("cut", "stall-body") and self.command != "HEAD":
                    self._send_head(status, headers, len(data))
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    if action == "stall-body":
                        time.sleep(fault.seconds)
                    self._hang_up()
                    return
                length = int(dict((k.lower(), v) for k, v in headers).get("content-length", len(data)))
                self._send_head(status, headers, length if self.command == "HEAD" else len(data))
                if self.command != "HEAD":
                    self.wfile.write(data)

        for method in ("GET", "PUT", "POST", "DELETE", "HEAD"):
            setattr(Handler, f"do_{method}", Handler._serve)
        return Handler
