"""A real HTTP server on loopback for tests: routes are plain functions, requests are recorded."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: object, status: int = 200) -> Reply:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    tls: bool = False  # it came over https


Route = Callable[[Seen], Reply]


class LoopbackServer:
    """``routes`` maps "METHOD /path" (path without query) to a function of the request; ``fallback`` answers
    the rest (404 without it). ``host`` is any loopback address (127.0.0.2 is "another host"). With ``tls``,
    the port speaks https to a client that opens with a TLS handshake and plain http to one that does not,
    so one port can be both ends of an https → http downgrade."""

    def __init__(
        self,
        routes: dict[str, Route] | None = None,
        *,
        fallback: Route | None = None,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.routes: dict[str, Route] = dict(routes or {})
        self.fallback = fallback
        self.seen: list[Seen] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                request = Seen(
                    self.command, self.path, dict(self.headers), body, isinstance(self.connection, ssl.SSLSocket)
                )
                server.seen.append(request)
                route = server.routes.get(f"{self.command} {urlsplit(self.path).path}") or server.fallback
                reply = route(request) if route else Reply(404, b"not found")
                self.send_response(reply.status)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = do_HEAD = _handle

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = _Server((host, 0), Handler, tls)
        self.port = self._httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}"
        self.http_url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Server(ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None):
        self._tls = tls
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, object]:
        connection, address = super().get_request()
        if self._tls is not None:
            connection.settimeout(5)
            try:
                opens_tls = connection.recv(1, socket.MSG_PEEK) == b"\x16"  # a TLS handshake record
            except OSError:
                opens_tls = False
            connection.settimeout(None)
            if opens_tls:
                connection = self._tls.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return connection, address

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hung up (a refused TLS handshake, say) is not the test's failure
