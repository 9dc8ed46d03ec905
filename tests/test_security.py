"""TLS, mutual TLS, tokens and roles (docs/security.md), on real nodes on 127.0.0.1 and
real ``meshstore`` subprocesses. A CA and its certificates are made per test session
with the ``cryptography`` package."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import logging
import ssl
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import eventually
from meshstore.approvals import approval_of
from meshstore.components import make_entity
from meshstore.errors import NotFoundError
from meshstore.grpc.client import ClientSecurity, RpcError, StoreClient, StoreUnavailableError
from meshstore.grpc.server import GrpcServer
from meshstore.node import Node
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import mesh_pb2, store_pb2
from meshstore.http.api import Api
from meshstore.security import GRPC_METHODS, HTTP_ROUTES, ServerSecurity, hash_token
from meshstore.store import Store
from test_cli import CLI, TIMEOUT, Served, assert_one_line_error, cli_env

pytestmark = pytest.mark.timeout(90)

TOKENS = {"viewer": "viewer-secret-3f1c", "sim": "ingest-secret-9a2e", "ops": "operator-secret-77b0"}
ROLES = {"viewer": ["reader"], "sim": ["ingest"], "ops": ["reader", "operator"], "node-a": ["peer"],
         "node-b": ["peer"]}


# ---- a CA and its certificates ---------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: Any, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ca.pem, and <name>.pem / <name>.key for the nodes (node-a, node-b: server and
    client, for 127.0.0.1 and localhost), an operator (ops) and one no CA signed (rogue)."""
    out = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)

    def make(cn: str, issuer_key: Any, issuer: x509.Name | None, ca: bool) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer or _name(cn))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return key, builder.sign(issuer_key or key, hashes.SHA256())

    ca_key, ca_cert = make("meshstore test CA", None, None, True)
    (out / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for cn in ("node-a", "node-b", "ops"):
        key, cert = make(cn, ca_key, ca_cert.subject, False)
        (out / f"{cn}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, out / f"{cn}.key")
    key, cert = make("rogue", None, None, False)  # self-signed
    (out / "rogue.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, out / "rogue.key")
    return {p.name.removesuffix(".pem").replace(".key", "_key"): p for p in out.iterdir()}


@pytest.fixture(scope="session")
def auth_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "auth.toml"
    lines = []
    for name, roles in ROLES.items():
        lines += ["[[identity]]", f'name = "{name}"', f"roles = {json.dumps(roles)}"]
        if name in TOKENS:
            lines.append(f'token_sha256 = "{hash_token(TOKENS[name])}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def client(pki: dict[str, Path], who: str | None = None, token: str | None = None, tls: bool = True,
           ) -> ClientSecurity:
    return ClientSecurity.load(str(pki["ca"]) if tls else None, str(pki[who]) if who else None,
                               str(pki[f"{who}_key"]) if who else None, token)


def pending_track(entity_id: str) -> pb.Entity:
    return make_entity(entity_id, pb.ENTITY_TYPE_TRACK, position=pb.PositionComponent(lat=1.0, lon=2.0),
                       approval=pb.ApprovalComponent(state=pb.APPROVAL_STATE_PENDING, timeout_seconds=60))


def has(store: Store, entity_id: str) -> bool:
    try:
        store.get(entity_id)
    except NotFoundError:
        return False
    return True


async def refused(call: Any) -> RpcError:
    with pytest.raises(RpcError) as caught:
        await call
    return caught.value


# ---- the policy ---------------------------------------------------------------------------

def test_every_rpc_and_every_api_route_has_its_roles() -> None:
    """A method or route missing from the table would need admin: a new one must be placed."""
    services = [store_pb2.DESCRIPTOR.services_by_name["EntityStoreService"],
                mesh_pb2.DESCRIPTOR.services_by_name["MeshService"]]
    assert set(GRPC_METHODS) == {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}
    with Store() as store:
        routes = {(r.method, r.path) for r in Api(store).routes()}
    assert set(HTTP_ROUTES) == routes | {("GET", "/metrics")}


# ---- TLS and mutual TLS ------------------------------------------------------------------

def test_tls_round_trip_and_a_plaintext_client_is_refused(pki: dict[str, Path]) -> None:
    async def scenario() -> None:
        security = ServerSecurity.load(str(pki["node-a"]), str(pki["node-a_key"]))
        async with Node(port=0, security=security) as node:
            async with StoreClient(node.address, security=client(pki)) as c:
                await c.create(pending_track("t1"))
                assert (await c.get("t1")).id == "t1"
            async with StoreClient(node.address, security=ClientSecurity(), rpc_timeout=1.0) as plain:
                with pytest.raises(StoreUnavailableError):
                    await plain.get("t1")

    asyncio.run(scenario())


def test_mutual_tls_refuses_a_client_without_a_certificate_of_its_ca(pki: dict[str, Path]) -> None:
    async def scenario() -> None:
        security = ServerSecurity.load(str(pki["node-a"]), str(pki["node-a_key"]), str(pki["ca"]))
        async with Node(port=0, security=security) as node:
            for who in (None, "rogue"):
                async with StoreClient(node.address, security=client(pki, who), rpc_timeout=1.0) as c:
                    with pytest.raises(StoreUnavailableError):
                        await c.get("t1")
            async with StoreClient(node.address, security=client(pki, "ops")) as c:
                await c.create(pending_track("t1"))  # mutual TLS alone: every verified client may do all

    asyncio.run(scenario())


# ---- identities and roles ----------------------------------------------------------------

def test_tokens_and_roles_over_grpc(pki: dict[str, Path], auth_file: Path) -> None:
    async def scenario() -> None:
        security = ServerSecurity.load(str(pki["node-a"]), str(pki["node-a_key"]), str(pki["ca"]), str(auth_file))
        async with Node(port=0, security=security) as node:
            async with StoreClient(node.address, security=client(pki, token=TOKENS["sim"])) as sim:
                await sim.create(pending_track("t1"))
            async with StoreClient(node.address, security=client(pki, token=TOKENS["viewer"])) as viewer:
                assert (await viewer.get("t1")).id == "t1"
                with pytest.raises(grpc.aio.AioRpcError) as denied:  # the seed's own method
                    await viewer.stub.UpdateEntity(store_pb2.UpdateEntityRequest(entity=pending_track("t1")))
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert denied.value.details() == ("'viewer' may not call UpdateEntity: it needs the role ingest or "
                                                  "admin and has roles reader")
                assert "PERMISSION_DENIED" in str(await refused(viewer.update(pending_track("t1"))))
            async with StoreClient(node.address, security=client(pki, token=TOKENS["sim"])) as sim:
                denied = await refused(sim.approve("t1"))
                assert "'sim' may not call ApproveAction: it needs the role operator or admin" in str(denied)
            async with StoreClient(node.address, security=client(pki, token="not-a-token")) as wrong:
                failed = await refused(wrong.get("t1"))
                assert "UNAUTHENTICATED" in str(failed) and "unknown bearer token" in str(failed)
            # Tokens make a client certificate optional, but a caller needs one or the other.
            async with StoreClient(node.address, security=client(pki)) as anonymous:
                failed = await refused(anonymous.get("t1"))
                assert "UNAUTHENTICATED" in str(failed) and "client certificate or an 'authorization" in str(failed)
            async with StoreClient(node.address, security=client(pki, "ops")) as ops:  # the certificate's CN
                decided = await ops.approve("t1")
            assert approval_of(decided).state == pb.APPROVAL_STATE_APPROVED
            assert approval_of(decided).decided_by == "ops"
            assert approval_of(node.store.get("t1")).decided_by == "ops"

    asyncio.run(scenario())


def test_a_token_without_tls_goes_to_a_local_store_only(auth_file: Path) -> None:
    async def scenario() -> None:
        security = ServerSecurity.load(auth_file=str(auth_file))
        async with Node(port=0, security=security) as node:
            async with StoreClient(node.address, security=ClientSecurity(token=TOKENS["sim"])) as sim:
                await sim.create(pending_track("t1"))
            async with StoreClient(node.address, security=ClientSecurity(token=TOKENS["ops"])) as ops:
                assert approval_of(await ops.deny("t1")).decided_by == "ops"

    asyncio.run(scenario())


def test_an_approval_records_who_decided_and_it_replicates_over_a_tls_mesh(pki: dict[str, Path],
                                                                           auth_file: Path) -> None:
    def node(name: str) -> Node:
        security = ServerSecurity.load(str(pki[name]), str(pki[f"{name}_key"]), str(pki["ca"]), str(auth_file))
        return Node(port=0, security=security, peer_security=client(pki, name))

    async def scenario() -> None:
        async with node("node-a") as a, node("node-b") as b:
            await a.start_relay([b.address])
            await b.start_relay([a.address])
            async with StoreClient(a.address, security=client(pki, token=TOKENS["sim"])) as sim:
                await sim.create(pending_track("t1"))
            await eventually(lambda: has(b.store, "t1"), what="t1 on b")
            async with StoreClient(b.address, security=client(pki, "ops")) as ops:
                await ops.approve("t1")

            def decided_on_a() -> bool:
                approval = approval_of(a.store.get("t1"))
                return approval.state == pb.APPROVAL_STATE_APPROVED and approval.decided_by == "ops"

            await eventually(decided_on_a, what="the decision, with who decided, on a")
            pushes = a.server.stats()["methods"]["/mesh.v1.MeshService/Push"]
            assert not pushes["failed"], pushes  # b's relay was let in as a peer

    asyncio.run(scenario())


def test_a_mesh_peer_without_the_peer_role_is_refused(pki: dict[str, Path], auth_file: Path) -> None:
    async def scenario() -> None:
        security = ServerSecurity.load(str(pki["node-a"]), str(pki["node-a_key"]), str(pki["ca"]), str(auth_file))
        async with Node(port=0, security=security) as a, Node(port=0, peer_security=client(pki, "ops")) as b:
            b.store.put(pending_track("t1"))
            await b.start_relay([a.address])

            def refused_push() -> bool:
                failed = dict(a.server.stats()["methods"].get("/mesh.v1.MeshService/Push", {}).get("failed", []))
                return failed.get("PERMISSION_DENIED", 0) > 0

            await eventually(refused_push, what="PERMISSION_DENIED on Push")
            assert not has(a.store, "t1")

    asyncio.run(scenario())


# ---- HTTP --------------------------------------------------------------------------------

def test_http_approve_needs_operator(pki: dict[str, Path], auth_file: Path) -> None:
    async def scenario() -> None:
        security = ServerSecurity.load(str(pki["node-a"]), str(pki["node-a_key"]), str(pki["ca"]), str(auth_file))
        async with Node(port=0, http_port=0, security=security) as node:
            node.store.put(pending_track("t1"))
            assert node.http.url.startswith("https://")
            context = ssl.create_default_context(cafile=str(pki["ca"]))

            async def post(token: str | None, scheme: str = "Bearer") -> tuple[int, dict[str, Any]]:
                headers = {"Authorization": f"{scheme} {token}"} if token else {}
                async with aiohttp.ClientSession() as http, http.post(
                        node.http.url + "api/entities/t1/approve", headers=headers, ssl=context) as response:
                    return response.status, await response.json()

            status, body = await post(None)
            assert status == 401 and "client certificate or an 'authorization" in body["error"]
            assert (await post("wrong"))[0] == 401
            status, body = await post(TOKENS["ops"], scheme="Basic")
            assert status == 401 and body["error"] == "the authorization header is not 'Bearer <token>'"
            status, body = await post(TOKENS["viewer"])
            assert status == 403, body
            assert body["error"] == ("'viewer' may not call POST /api/entities/{id}/approve: it needs the role "
                                     "operator or admin and has roles reader")
            assert approval_of(node.store.get("t1")).state == pb.APPROVAL_STATE_PENDING
            status, body = await post(TOKENS["ops"])
            assert status == 200 and body["approval"]["decided_by"] == "ops", body

            # A browser under mutual TLS: its certificate names it.
            context.load_cert_chain(pki["ops"], pki["ops_key"])
            node.store.put(pending_track("t2"))
            async with aiohttp.ClientSession() as http:
                async with http.post(node.http.url + "api/entities/t2/deny", ssl=context) as response:
                    assert response.status == 200
                    assert (await response.json())["approval"]["decided_by"] == "ops"
                async with http.get(node.http.url, ssl=context) as response:
                    assert response.status == 200  # the page itself holds no data

    asyncio.run(scenario())


def test_metrics_port_has_the_same_tls_and_roles(pki: dict[str, Path], auth_file: Path) -> None:
    async def scenario() -> None:
        security = ServerSecurity.load(str(pki["node-a"]), str(pki["node-a_key"]), str(pki["ca"]), str(auth_file))
        async with Node(port=0, metrics_port=0, security=security) as node:
            url = f"https://{node.metrics_address}/metrics"
            context = ssl.create_default_context(cafile=str(pki["ca"]))
            async with aiohttp.ClientSession() as http:
                async with http.get(url, ssl=context) as response:
                    assert response.status == 401
                async with http.get(url, ssl=context, headers={"Authorization": f"Bearer {TOKENS['viewer']}"}
                                    ) as response:
                    assert response.status == 200 and "meshstore_entities" in await response.text()

    asyncio.run(scenario())


# ---- the command line, logs and warnings --------------------------------------------------

def test_cli_with_tls_and_tokens_and_no_token_in_any_log(pki: dict[str, Path], auth_file: Path,
                                                         tmp_path: Path) -> None:
    tls = {"MESHSTORE_TLS_CERT": str(pki["node-a"]), "MESHSTORE_TLS_KEY": str(pki["node-a_key"]),
           "MESHSTORE_TLS_CA": str(pki["ca"]), "MESHSTORE_AUTH_FILE": str(auth_file),
           "MESHSTORE_LOG_LEVEL": "debug"}
    server = Served(tmp_path, **tls)
    try:
        def run(*args: str, token: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
            extra = {"MESHSTORE_TLS_CA": str(pki["ca"]), **env}
            if token is not None:
                extra["MESHSTORE_TOKEN"] = token
            return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=TIMEOUT,
                                  env=cli_env(server.addr, **extra))

        outputs = []
        sim = subprocess.run([*CLI, "--tls-ca", str(pki["ca"]), "--token", TOKENS["sim"], "stats"],
                             capture_output=True, text=True, timeout=TIMEOUT, env=cli_env(server.addr))
        assert sim.returncode == 0, sim.stderr
        outputs.append(sim)
        outputs.append(denied := run("approve", "t1", token=TOKENS["viewer"]))
        assert_one_line_error(denied, 1, "refused ApproveAction (PERMISSION_DENIED)",
                              "'viewer' may not call ApproveAction")
        outputs.append(wrong := run("list", token="wrong-token-5d2c"))
        assert_one_line_error(wrong, 1, "refused ListEntities (UNAUTHENTICATED): unknown bearer token")
        plaintext = subprocess.run([*CLI, "list"], capture_output=True, text=True, timeout=TIMEOUT,
                                   env=cli_env(server.addr, MESHSTORE_TOKEN=TOKENS["viewer"]))
        assert_one_line_error(plaintext, 1, "cannot reach the store", "is it a TLS store?")
        outputs.append(ok := run("list", "--json", token=TOKENS["viewer"]))
        assert ok.returncode == 0, ok.stderr
        # Mutual TLS from the command line: the operator's certificate.
        outputs.append(ops := run("pending", "--json", MESHSTORE_TLS_CERT=str(pki["ops"]),
                                  MESHSTORE_TLS_KEY=str(pki["ops_key"])))
        assert ops.returncode == 0, ops.stderr
    finally:
        assert server.stop() == 0
    log = server.text()
    assert "request refused" in log and "PERMISSION_DENIED" in log and "UNAUTHENTICATED" in log
    for secret in [*TOKENS.values(), "wrong-token-5d2c"]:
        assert secret not in log
        for out in outputs:
            assert secret not in out.stdout + out.stderr


def test_token_hash_prints_what_the_auth_file_keeps() -> None:
    result = subprocess.run([*CLI, "token", "hash"], input="s3cret\n", capture_output=True, text=True,
                            timeout=TIMEOUT, env=cli_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hashlib.sha256(b"s3cret").hexdigest()
    assert "s3cret" not in result.stdout + result.stderr


def test_bad_security_settings_are_one_line_errors(pki: dict[str, Path], tmp_path: Path) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "serve", "--port", "0", "--in-memory", *args], capture_output=True, text=True,
                              timeout=TIMEOUT, env=cli_env())

    assert_one_line_error(serve("--tls-cert", str(pki["node-a"])), 2, "--tls-cert and --tls-key go together")
    assert_one_line_error(serve("--tls-cert", str(pki["node-a"]), "--tls-key", str(tmp_path / "none.key")), 2,
                          "cannot read the TLS key")
    bad = tmp_path / "auth.toml"
    bad.write_text('[[identity]]\nname = "x"\nroles = ["root"]\n')
    assert_one_line_error(serve("--auth-file", str(bad)), 2, "roles must be a non-empty list of reader")
    bad.write_text('[[identity]]\nname = "node-b"\nroles = ["peer"]\n')
    assert_one_line_error(serve("--auth-file", str(bad)), 2, "no one could call: the auth file")
    assert_one_line_error(serve("--tls-cert", str(pki["node-a"]), "--tls-key", str(pki["ops_key"])), 1,
                          "cannot use the TLS certificate and key")


@pytest.mark.parametrize("tls", [False, True])
def test_binding_beyond_loopback_without_tls_warns(pki: dict[str, Path], tls: bool,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    security = ServerSecurity.load(str(pki["node-a"]), str(pki["node-a_key"])) if tls else None

    async def scenario() -> None:
        with Store() as store:
            server = GrpcServer(store, "0.0.0.0", 0, security=security)
            await server.start()
            await server.stop(None)

    with caplog.at_level(logging.WARNING, logger="meshstore.security"):
        asyncio.run(scenario())
    warned = [r for r in caplog.records if "without TLS" in r.getMessage()]
    assert bool(warned) is not tls
