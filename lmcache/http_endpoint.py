"""A small HTTP endpoint for operators: ``GET /metrics`` (Prometheus text) and ``GET /health`` (JSON).

Served by a stdlib ``ThreadingHTTPServer`` on a daemon thread, so it never keeps a process alive
and never touches the request path of the cache. The cache server starts one with
``--metrics-port``; the in-process connector starts one per process when ``metrics_port`` is set
(see :func:`start_process_endpoint`).

``/health`` answers 200 with ``"status": "ok"`` while every configured tier is up, and 503 with
``"status": "degraded"`` while one is down (the cache keeps serving from the tiers that are up), so
a readiness probe or an alert can use the status code alone.

Clients are not trusted: each connection has ``request_timeout_s`` in all to send its request (a
client that sends nothing, or trickles its headers byte by byte, is cut off) and as long again for
each reply; at most ``max_connections`` are served at once, and one beyond that is answered 503 and
closed, so idle connections cannot pile up threads in the process.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lmcache.logging import init_logger
from lmcache.metrics import as_source, health_report, make_registry, snapshot_of

logger = init_logger(__name__)

__all__ = ["MetricsEndpoint", "process_endpoint", "start_process_endpoint"]

REQUEST_TIMEOUT_S = 10.0
"""Longest a connection may take to send its request (and, separately, to take each reply)."""
MAX_CONNECTIONS = 16
"""Connections served at once; one more is answered 503 and closed."""
_BUSY_BODY = b"too many connections to the metrics endpoint; try again later\n"
_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    endpoint: MetricsEndpoint

    def __init__(self, address: tuple[str, int], max_connections: int, request_timeout_s: float) -> None:
        self.slots = threading.BoundedSemaphore(max_connections)
        self.request_timeout_s = request_timeout_s
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve ``request`` on its own thread if a slot is free, else answer 503 and close it."""
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.setblocking(False)  # a fresh connection's send buffer takes it whole
                request.send(_BUSY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed in the socket (the client hung up, or stalled past its time): one
        DEBUG line, never a traceback on stderr (a scraper that gives up is no server error)."""
        logger.debug("metrics endpoint: connection from %s ended: %r", client_address, sys.exc_info()[1])


class _Server6(_Server):
    address_family = socket.AF_INET6


class _DeadlineReader(io.RawIOBase):
    """The request bytes of ``sock``, with no read waiting past ``deadline`` (``time.monotonic``): a
    request trickled byte by byte times out like one never sent (``TimeoutError``)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(remaining)
        return self.sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "lmcache-metrics"

    def setup(self) -> None:
        self.timeout = self.server.request_timeout_s
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, time.monotonic() + self.timeout))

    def version_string(self) -> str:
        """The ``Server`` header: the product alone, no Python version."""
        return self.server_version

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            code, content_type, body = self._reply(path)
        except Exception:  # noqa: BLE001 - an endpoint error must not kill the thread
            # The reason stays in the log: exception text may name paths, hosts or keys.
            logger.exception("metrics endpoint: %s failed", path)
            code, content_type = 500, "text/plain; charset=utf-8"
            body = b"internal error; the process's log says why\n"
        # An OSError while sending (the client hung up) ends in the server's handle_error.
        self._send(code, content_type, body)

    def _reply(self, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body of ``GET path``."""
        endpoint = self.server.endpoint
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(endpoint.registry)
        if path == "/health":
            healthy, body = endpoint.health()
            return 200 if healthy else 503, "application/json", json.dumps(body).encode()
        if path == "/":
            return 200, "text/plain; charset=utf-8", b"lmcache: GET /metrics, GET /health\n"
        return 404, "text/plain; charset=utf-8", b"not found; try /metrics or /health\n"

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.connection.settimeout(self.timeout)  # the reply gets its own time, not the request's rest
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        logger.debug("metrics endpoint %s: " + format, self.address_string(), *args)


class MetricsEndpoint:
    """Serves an engine's ``/metrics`` and ``/health`` on ``host:port`` (port 0: any free port).

    ``engine`` and ``server`` are the objects or zero-argument callables returning them. After
    :meth:`start`, :attr:`port` is the bound port and :attr:`url` the base URL. ``max_connections``
    and ``request_timeout_s`` bound what each HTTP client holds (see the module docstring).
    """

    def __init__(
        self,
        engine: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        server: Any = None,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self._engine: Callable[[], Any] = as_source(engine)
        self._server_source: Callable[[], Any] = as_source(server)
        self.registry = make_registry(self._engine, self._server_source)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``(healthy, body)`` of ``GET /health``, from the engine's snapshot."""
        return health_report(snapshot_of(self._engine()), self._server_source())

    def start(self) -> MetricsEndpoint:
        """Bind and serve on a daemon thread; raises ``OSError`` if the address cannot be bound."""
        if self._httpd is not None:
            return self
        server_class = _Server6 if ":" in self.host else _Server
        httpd = server_class((self.host, self.requested_port), self.max_connections, self.request_timeout_s)
        httpd.endpoint = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.5}, name="lmcache-metrics", daemon=True
        )
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("metrics endpoint not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1" if host != "::" else "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MetricsEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_process_endpoint: MetricsEndpoint | None = None
_process_tried = False
_process_lock = threading.Lock()


def start_process_endpoint(engine: Any, port: int, host: str = "127.0.0.1") -> MetricsEndpoint | None:
    """The process's one endpoint, started on first call (later calls return it unchanged).

    A port that cannot be bound is logged, not raised: metrics never stop the cache from working.
    """
    global _process_endpoint, _process_tried
    with _process_lock:
        if _process_tried:
            return _process_endpoint
        _process_tried = True
        endpoint = MetricsEndpoint(engine, host=host, port=port)
        try:
            endpoint.start()
        except OSError as exc:
            logger.warning(
                "LMCache metrics: cannot listen on %s:%d (%s); /metrics and /health are off in this process",
                host,
                port,
                exc,
            )
            return None
        _process_endpoint = endpoint
        logger.info("LMCache metrics: %s/metrics, health: %s/health", endpoint.url, endpoint.url)
        return endpoint


def process_endpoint() -> MetricsEndpoint | None:
    """The endpoint :func:`start_process_endpoint` started in this process, if any."""
    return _process_endpoint
