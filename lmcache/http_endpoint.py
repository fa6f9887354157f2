"""A small HTTP endpoint for operators: ``GET /metrics`` (Prometheus text) and ``GET /health`` (JSON).

Served by a stdlib ``ThreadingHTTPServer`` on a daemon thread, so it never keeps a process alive
and never touches the request path of the cache. The cache server starts one with
``--metrics-port``; the in-process connector starts one per process when ``metrics_port`` is set
(see :func:`start_process_endpoint`).

``/health`` answers 200 with ``"status": "ok"`` while every configured tier is up, and 503 with
``"status": "degraded"`` while one is down (the cache keeps serving from the tiers that are up), so
a readiness probe or an alert can use the status code alone.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lmcache.logging import init_logger
from lmcache.metrics import as_source, health_report, make_registry, snapshot_of

logger = init_logger(__name__)

__all__ = ["MetricsEndpoint", "process_endpoint", "start_process_endpoint"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    endpoint: MetricsEndpoint


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "lmcache-metrics"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urlsplit(self.path).path.rstrip("/") or "/"
        endpoint = self.server.endpoint
        try:
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(endpoint.registry))
            elif path == "/health":
                healthy, body = endpoint.health()
                self._send(200 if healthy else 503, "application/json", json.dumps(body).encode())
            elif path == "/":
                self._send(200, "text/plain; charset=utf-8", b"lmcache: GET /metrics, GET /health\n")
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found; try /metrics or /health\n")
        except Exception as exc:  # noqa: BLE001 - an endpoint error must not kill the thread
            logger.exception("metrics endpoint: %s failed", path)
            self._send(500, "text/plain; charset=utf-8", f"{type(exc).__name__}: {exc}\n".encode())

    def _send(self, code: int, content_type: str, body: bytes) -> None:
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
    :meth:`start`, :attr:`port` is the bound port and :attr:`url` the base URL.
    """

    def __init__(self, engine: Any, *, host: str = "127.0.0.1", port: int = 0, server: Any = None) -> None:
        self.host = host
        self.requested_port = port
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
        httpd = server_class((self.host, self.requested_port), _Handler)
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
