"""Who may do what on a node (docs/security.md): the roles, which gRPC method and HTTP
route each role may call, the identities of an auth file, token hashes, the server's
TLS material, and the warning for an exposed plaintext port. This module is the one
definition of the policy: the Rust gRPC server gets it at start (``Policy.for_core``)
and enforces it before any handler runs; the HTTP ports (the API and page, the
metrics) enforce it in ``http_middleware``.

    security = ServerSecurity.load(cert="node.pem", key="node.key", ca="ca.pem", auth_file="auth.toml")
    Node(security=security)

An auth file (TOML) names each identity, its roles and, for bearer tokens, the SHA-256
of its token (``meshstore token hash``); an identity without a token is one a client
certificate names (its common name, else its first DNS name)::

    [[identity]]
    name = "ops-console"
    roles = ["reader", "operator"]
    token_sha256 = "9f86d081884c7d65..."

    [[identity]]
    name = "node-b"            # the CN of node b's certificate
    roles = ["peer"]

Without an auth file (and without a client CA) every call is allowed, as before.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import ssl
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from meshstore.logs import event as log_event

__all__ = [
    "ADMIN", "GRPC_METHODS", "HTTP_OPEN_ROUTES", "HTTP_ROUTES", "IDENTITY", "ROLES", "Policy", "SecurityError",
    "ServerSecurity", "ServerTls", "hash_token", "http_middleware", "is_loopback", "warn_if_exposed",
]

log = logging.getLogger("meshstore.security")

READER, INGEST, OPERATOR, PEER, ADMIN = "reader", "ingest", "operator", "peer", "admin"
#: Every role; ``admin`` may call everything.
ROLES = (READER, INGEST, OPERATOR, PEER, ADMIN)

# Reading is open to every role that needs to see the store to do its job.
_READ = frozenset({READER, INGEST, OPERATOR, PEER})
_STORE = "/store.v1.EntityStoreService/"
#: Per gRPC method path, the roles that may call it (a method not listed needs ``admin``).
GRPC_METHODS: Mapping[str, frozenset[str]] = {
    **{_STORE + m: _READ for m in ("GetEntity", "ListEntities", "WatchEntities", "WatchEntityBatches",
                                    "GetStats")},
    **{_STORE + m: frozenset({INGEST}) for m in ("CreateEntity", "UpdateEntity", "UpdateEntityDetailed",
                                                  "UpdateEntities", "DeleteEntity", "PublishEntities")},
    _STORE + "ApproveAction": frozenset({OPERATOR}),
    _STORE + "DenyAction": frozenset({OPERATOR}),
    "/mesh.v1.MeshService/Push": frozenset({PEER}),
}
#: Per HTTP route (method, aiohttp route pattern) of the API and the metrics port, the
#: roles that may call it; the page itself (``/``, ``/static/...``) is open: it holds no data.
HTTP_ROUTES: Mapping[tuple[str, str], frozenset[str]] = {
    **{("GET", path): _READ for path in ("/api/entities", "/api/entities.geojson", "/api/entities/{id}",
                                          "/api/pending", "/api/mesh", "/api/events")},
    ("POST", "/api/entities/{id}/approve"): frozenset({OPERATOR}),
    ("POST", "/api/entities/{id}/deny"): frozenset({OPERATOR}),
    ("GET", "/metrics"): _READ,
}
HTTP_OPEN_ROUTES = frozenset({"/", "/index.html", "/static/{path}"})
#: Where ``http_middleware`` leaves the caller's identity on a request (an approval
#: records who decided).
IDENTITY = web.RequestKey("identity", str)


class SecurityError(ValueError):
    """Unusable security settings (a file that cannot be read, a bad auth file)."""


def hash_token(token: str) -> str:
    """What an auth file keeps of a token: its SHA-256, lower-case hex."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


def is_loopback(host: str) -> bool:
    """True if ``host`` binds only this machine (localhost, 127.x, ::1)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Policy:
    """Identities and their roles (``roles``), and the identity each token hash stands for
    (``tokens``)."""

    roles: Mapping[str, frozenset[str]] = field(default_factory=dict)
    tokens: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Reads an auth file. SecurityError with the file and the problem."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise SecurityError(f"cannot read the auth file {path}: {exc}") from None
        entries = data.get("identity", [])
        if not isinstance(entries, list) or not entries:
            raise SecurityError(f"auth file {path}: no [[identity]] entries")
        roles: dict[str, frozenset[str]] = {}
        tokens: dict[str, str] = {}
        for n, entry in enumerate(entries, 1):
            where = f"auth file {path}, identity {n}"
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not name.strip():
                raise SecurityError(f"{where}: needs a name")
            if name in roles:
                raise SecurityError(f"{where}: the name {name!r} is used twice")
            given = entry.get("roles", [])
            unknown = [r for r in given if r not in ROLES] if isinstance(given, list) else [given]
            if unknown or not given:
                raise SecurityError(f"{where} ({name}): roles must be a non-empty list of {', '.join(ROLES)}; "
                                    f"got {given!r}")
            roles[name] = frozenset(given)
            digest = entry.get("token_sha256")
            if digest is not None:
                if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                    raise SecurityError(f"{where} ({name}): token_sha256 must be 64 lower-case hex digits "
                                        "(`meshstore token hash`)")
                if digest in tokens:
                    raise SecurityError(f"{where} ({name}): the same token as {tokens[digest]!r}")
                tokens[digest] = name
        return cls(roles, tokens)

    def identify(self, authorization: str | None, certificate_name: str | None) -> str:
        """The caller's identity from its ``Authorization: Bearer <token>`` header, else
        its certificate's name. PermissionError (the reason, never the token) when
        neither tells."""
        if authorization is not None:
            token = authorization.removeprefix("Bearer ").strip()
            if not authorization.startswith("Bearer ") or not token:
                raise PermissionError("the authorization header is not 'Bearer <token>'")
            name = self.tokens.get(hash_token(token))
            if name is None:
                raise PermissionError("unknown bearer token")
            return name
        if certificate_name:
            return certificate_name
        raise PermissionError("this server needs a client certificate or an 'authorization: Bearer <token>' header")

    def refusal(self, name: str, needs: frozenset[str], what: str) -> str | None:
        """Why ``name`` may not call ``what`` (which ``needs`` one of those roles), None if
        it may. The same words as the gRPC server's PERMISSION_DENIED."""
        has = self.roles.get(name, frozenset())
        if ADMIN in has or has & needs:
            return None
        wanted = " or ".join(sorted(needs) + [ADMIN]) if needs else ADMIN
        held = f"roles {' or '.join(sorted(has))}" if has else "no role"
        return f"'{name}' may not call {what}: it needs the role {wanted} and has {held}"

    def for_core(self) -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, str]]:
        """What the Rust server enforces: roles per method, per identity, identity per token hash."""
        return ({m: set(r) for m, r in GRPC_METHODS.items()}, {n: set(r) for n, r in self.roles.items()},
                dict(self.tokens))


def _read(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise SecurityError(f"the {what} {path} is not PEM")
    return data


@dataclass(frozen=True)
class ServerTls:
    """A node's certificate (chain) and key, PEM, and the CA its clients' certificates
    are verified against (mutual TLS) when given. Paths are kept for aiohttp."""

    cert: Path
    key: Path
    ca: Path | None
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    ca_pem: bytes | None = field(repr=False)

    @classmethod
    def load(cls, cert: str | Path, key: str | Path, ca: str | Path | None = None) -> ServerTls:
        return cls(Path(cert), Path(key), None if ca is None else Path(ca), _read(cert, "TLS certificate"),
                   _read(key, "TLS key"), None if ca is None else _read(ca, "TLS CA"))

    def ssl_context(self, client_cert_optional: bool) -> ssl.SSLContext:
        """The HTTP side's server context: the same certificate, the same client checks."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.ca is not None:
                context.load_verify_locations(self.ca)
                context.verify_mode = ssl.CERT_OPTIONAL if client_cert_optional else ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise SecurityError(f"cannot use the TLS certificate {self.cert} and key {self.key}: {exc}") from None
        return context


@dataclass(frozen=True)
class ServerSecurity:
    """What a node's ports require: TLS (None: plaintext) and the policy (None: every call
    allowed). A client CA without an auth file lets every verified certificate do
    everything (mutual TLS alone)."""

    tls: ServerTls | None = None
    policy: Policy | None = None

    @classmethod
    def load(cls, cert: str | None = None, key: str | None = None, ca: str | None = None,
             auth_file: str | None = None) -> ServerSecurity:
        """From ``serve``'s options. SecurityError for an incomplete or unreadable set."""
        if (cert is None) != (key is None):
            raise SecurityError("--tls-cert and --tls-key go together")
        if ca is not None and cert is None:
            raise SecurityError("--tls-ca needs --tls-cert and --tls-key (the server's own certificate)")
        tls = ServerTls.load(cert, key, ca) if cert is not None and key is not None else None
        policy = Policy.load(auth_file) if auth_file is not None else None
        if policy is not None and not policy.tokens and (tls is None or tls.ca is None):
            raise SecurityError(f"no one could call: the auth file {auth_file} has no tokens, and without --tls-ca "
                                "no client certificate names anyone")
        return cls(tls, policy)

    @property
    def client_cert_optional(self) -> bool:
        """With a client CA, a client may come without a certificate only if tokens exist."""
        return self.policy is not None and bool(self.policy.tokens)

    def core_tls(self) -> tuple[bytes, bytes, bytes | None, bool] | None:
        t = self.tls
        return None if t is None else (t.cert_pem, t.key_pem, t.ca_pem, self.client_cert_optional)

    def ssl_context(self) -> ssl.SSLContext | None:
        return None if self.tls is None else self.tls.ssl_context(self.client_cert_optional)


def warn_if_exposed(host: str, security: ServerSecurity | None, what: str) -> None:
    """Logs a warning when ``host`` is reachable from other machines without TLS."""
    if not is_loopback(host) and (security is None or security.tls is None):
        log_event(log, logging.WARNING, "listening beyond this machine without TLS: anyone who reaches the "
                  "port can read, and without an auth file write and approve (see docs/security.md)",
                  port=what, host=host)


def _certificate_name(request: web.Request) -> str | None:
    """The verified client certificate's common name, else its first DNS name."""
    cert = request.transport.get_extra_info("peercert") if request.transport is not None else None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return next((value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"), None)


def http_middleware(policy: Policy) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The policy on every route of an aiohttp application (``HTTP_ROUTES``; a route not
    listed needs ``admin``; ``HTTP_OPEN_ROUTES`` are open): JSON ``{"error": ...}`` 401
    when the caller cannot be identified, 403 when its roles do not allow the route."""

    def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
        return web.json_response({"error": message}, status=status, headers=headers)

    @web.middleware
    async def authorize(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if request.match_info.http_exception is not None or resource is None or (
                resource.canonical in HTTP_OPEN_ROUTES):
            return await handler(request)  # 404 / 405, or the page
        route = resource.canonical
        try:
            name = policy.identify(request.headers.get("Authorization"), _certificate_name(request))
        except PermissionError as exc:
            return error(401, str(exc), {"WWW-Authenticate": "Bearer"})
        refusal = policy.refusal(name, HTTP_ROUTES.get((request.method, route), frozenset()),
                                 f"{request.method} {route}")
        if refusal is not None:
            log_event(log, logging.WARNING, "request refused", method=request.method, path=request.path,
                      identity=name, error=refusal)
            return error(403, refusal)
        request[IDENTITY] = name
        return await handler(request)

    return authorize
