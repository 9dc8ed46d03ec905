"""The node's HTTP side: a JSON API over a store, its live feed as Server-Sent Events,
and the web page (``static/``).

Framework: aiohttp's server. It runs on the node's own asyncio event loop (the loop
the gRPC server and the relay use) through an ``AppRunner`` and a ``TCPSite``: no
second loop, no thread. The SSE feed is a plain ``StreamResponse``.

    server = HttpServer(store, "127.0.0.1", 0, stats=node.stats)
    await server.start()            # .port (the bound one), .address
    await server.stop(grace=1.0)

Routes: ``/`` is ``static/index.html``, ``/static/*`` the page's files, ``/api/*`` the
API (``meshstore.http.api``; the contract is docs/http.md). Every error is JSON
``{"error": message}``, unknown routes (404) and wrong methods (405) included; request
bodies beyond ``max_body_bytes`` are 413. The server runs with handler cancellation:
a client that goes away cancels its handler (an SSE stream's watcher is closed at once).

With ``security`` (``meshstore.security.ServerSecurity``, docs/security.md): HTTPS with
the gRPC side's certificate and client checks, and each API route checked against the
roles policy (401: who calls is unknown, 403: its roles do not allow the route); an
approval records who decided.

``stop``: open SSE streams are ended, no new connections, in-flight requests get
``grace`` seconds, then are cancelled. ``meshstore.node.Node`` runs one when
``NodeOptions.http_port`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from meshstore.grpc.status import status_for
from meshstore.http.api import Api, BadRequest, json_error
from meshstore.logs import event as log_event
from meshstore.security import Policy, ServerSecurity, http_middleware, warn_if_exposed
from meshstore.store import Store
from meshstore.validate import is_number

__all__ = ["DEFAULT_MAX_BODY_BYTES", "STATIC_DIR", "HttpListenError", "HttpServer", "make_app"]

log = logging.getLogger("meshstore.http")

#: The page's files (shipped in the package).
STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Largest request body accepted (the API's POSTs take none).
DEFAULT_MAX_BODY_BYTES = 64 * 1024

# grpc status code name -> HTTP status, for the store's exceptions (status_for).
_HTTP_STATUS = {
    "NOT_FOUND": 404, "FAILED_PRECONDITION": 409, "ABORTED": 409, "ALREADY_EXISTS": 409,
    "INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "UNAVAILABLE": 503, "INTERNAL": 500,
}


class HttpListenError(OSError):
    """The HTTP address cannot be bound (in use, bad host)."""


def _error_middleware(tasks: set[asyncio.Task]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Every failure as JSON ``{"error": ...}``; also keeps the tasks of in-flight requests
    (so that ``stop`` can wait for exactly these)."""

    @web.middleware
    async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is not None:
            tasks.add(task)
        try:
            return await handler(request)
        except BadRequest as exc:
            return json_error(400, str(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
            return json_error(exc.status, _http_message(request, exc), headers)
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the store's errors; anything else is a bug
            code, message = status_for(exc)
            status = _HTTP_STATUS.get(code.name, 500)
            if status == 500:
                log_event(log, logging.ERROR, "request failed", method=request.method, path=request.path,
                          error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            else:
                log_event(log, logging.INFO, "request failed", method=request.method, path=request.path,
                          status=status, error=message)
            return json_error(status, message)
        finally:
            if task is not None:
                tasks.discard(task)

    return errors


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    where = request.path if len(request.path) <= 200 else request.path[:200] + "..."
    if exc.status == 404:
        return f"no such resource: {request.method} {where}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"method {request.method} not allowed on {where}" + (f" (allowed: {allowed})" if allowed else "")
    if exc.status == 413:
        return f"request body too large: {exc.text}"
    return exc.text or exc.reason


def make_app(api: Api, static_dir: Path | None = STATIC_DIR, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
             tasks: set[asyncio.Task] | None = None, policy: Policy | None = None) -> web.Application:
    """The aiohttp application: the API's routes, ``/`` and ``/static/*``; with a
    ``policy``, each API route checked against it."""
    middlewares = [_error_middleware(tasks if tasks is not None else set())]
    if policy is not None:
        middlewares.append(http_middleware(policy))
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
    app.add_routes(api.routes())
    if static_dir is not None:
        index = static_dir / "index.html"

        async def page(request: web.Request) -> web.StreamResponse:
            if not index.is_file():
                raise web.HTTPNotFound()
            return web.FileResponse(index, headers={"Cache-Control": "no-cache"})

        root = static_dir.resolve()

        async def static_file(request: web.Request) -> web.StreamResponse:
            # Not add_static: its misses answer a bare 404, not the API's JSON error.
            target = (root / request.match_info["path"]).resolve()
            if root not in target.parents or not target.is_file():
                raise web.HTTPNotFound()
            return web.FileResponse(target, headers={"Cache-Control": "no-cache"})

        app.router.add_get("/", page, allow_head=True)
        app.router.add_get("/index.html", page, allow_head=True)
        app.router.add_get("/static/{path:.+}", static_file, allow_head=True)
    return app


def _address_of(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def listen(runner: web.AppRunner, host: str, port: int, security: ServerSecurity | None,
                 what: str) -> tuple[web.TCPSite, int]:
    """Serves a set-up ``runner`` on ``host:port`` (TLS per ``security``; a warning when an
    exposed address has none) and returns its site and bound port. HttpListenError if the
    address cannot be bound; the runner is cleaned up on any failure."""
    warn_if_exposed(host, security, what)
    try:
        ssl_context = security.ssl_context() if security is not None else None
        site = web.TCPSite(runner, host or None, port, ssl_context=ssl_context)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise HttpListenError(f"cannot listen on {_address_of(host, port)} ({what}): {exc.strerror or exc}") from None
    except BaseException:
        await runner.cleanup()
        raise
    bound = [a for a in runner.addresses if isinstance(a, tuple)]
    return site, bound[0][1] if bound else port


class HttpServer:
    """The HTTP API and the web page over ``store``, on ``host:port`` (port 0: any free
    port; ``.port`` says which once started).

    ``stats``: the node's ``stats()`` (``/api/mesh`` shows its peer links); ``heartbeat``
    and ``flush_interval``: the SSE feed's comment interval when idle and its batch
    interval, in seconds; ``max_body_bytes``: larger request bodies are 413;
    ``static_dir``: the page's files (None: API only); ``security``: TLS (the gRPC side's
    certificate and client checks) and the roles policy (None: plain HTTP, open)."""

    def __init__(self, store: Store, host: str = "127.0.0.1", port: int = 0, *,
                 stats: Callable[[], Mapping[str, Any]] | None = None, heartbeat: float = 15.0,
                 flush_interval: float = 0.1, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 static_dir: Path | str | None = STATIC_DIR, security: ServerSecurity | None = None) -> None:
        if not isinstance(host, str):
            raise TypeError(f"host must be a str, got {type(host).__name__}")
        if not is_number(port, integer=True) or not 0 <= port <= 65535:
            raise ValueError(f"http port must be an int in 0..65535, got {port!r}")
        for name, value in (("heartbeat", heartbeat), ("flush_interval", flush_interval)):
            if not is_number(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not is_number(max_body_bytes, integer=True) or max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be an int >= 0, got {max_body_bytes!r}")
        self.store = store
        self.host = host
        self.port = port
        self.api = Api(store, stats, heartbeat=heartbeat, flush_interval=flush_interval)
        self._tasks: set[asyncio.Task] = set()
        self.security = security
        self.app = make_app(self.api, None if static_dir is None else Path(static_dir), max_body_bytes, self._tasks,
                            security.policy if security is not None else None)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._state = "new"  # -> "started" -> "stopped"
        self._started = 0.0

    @property
    def address(self) -> str:
        """host:port (the bound port once started)."""
        return _address_of(self.host, self.port)

    @property
    def url(self) -> str:
        """``http://host:port/`` (``https`` with TLS), 127.0.0.1 for a wildcard host."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        scheme = "https" if self.security is not None and self.security.tls is not None else "http"
        return f"{scheme}://{_address_of(host, self.port)}/"

    @property
    def running(self) -> bool:
        return self._state == "started"

    async def start(self) -> HttpServer:
        """Binds and serves. HttpListenError (an OSError) if the address cannot be bound
        (in use, bad host)."""
        if self._state != "new":
            raise RuntimeError("an HTTP server starts once")
        self._state = "starting"
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site, self.port = await listen(runner, self.host, self.port, self.security, "http")
        except BaseException:
            self._state = "stopped"
            raise
        self._runner, self._site, self._started = runner, site, time.monotonic()
        self._state = "started"
        return self

    def stats(self) -> dict[str, Any]:
        """Open SSE streams, in-flight requests and the API's counters."""
        return {"address": self.address if self._state != "new" else None, "sse_streams": self.api.open_streams,
                "requests_in_flight": len(self._tasks), **self.api.counters,
                "uptime_seconds": round(time.monotonic() - self._started, 3) if self._runner else 0.0}

    async def stop(self, grace: float = 5.0) -> None:
        """Ends open SSE streams, stops listening, gives in-flight requests ``grace``
        seconds, then cancels them and closes every connection. Idempotent."""
        if self._state != "started":
            self._state = "stopped"
            return
        self._state = "stopped"
        self.api.close_streams()
        runner, site = self._runner, self._site
        assert runner is not None and site is not None
        await site.stop()
        current = asyncio.current_task()
        calls = {t for t in self._tasks if t is not current}
        if calls:
            _, late = await asyncio.wait(calls, timeout=grace)
            for task in late:
                task.cancel()
        await runner.cleanup()

    def stop_now(self) -> None:
        """Cancels every in-flight request at once (also while a graceful ``stop`` waits)."""
        self.api.close_streams()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
