"""The deployment files (deploy/): no container engine runs here, so they are read and
checked against the code they start. The Dockerfile is multi-stage (the wheel built in
one stage, installed in a slim runtime), runs as a non-root user and has a health
check; compose runs the 3-node mesh and the pipeline against node a; the Kubernetes
manifests are a StatefulSet with a volume for the data dir, a headless Service, a
PodDisruptionBudget, gRPC health probes and Prometheus annotations. Every command line
a container runs parses with the ``meshstore`` CLI (click's ``make_context``, which
checks every option without running the command), with the container's environment,
and agrees with the file around it (ports, data dir)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from typing import Any

import click
import pytest
import typer
import yaml

from meshstore.cli import app

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DATA_DIR = "/var/lib/meshstore/data"


# ---- reading the files ----------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, (KEYWORD, rest), continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each from its FROM on."""
    out: list[list[tuple[str, str]]] = []
    for keyword, rest in dockerfile():
        if keyword == "FROM":
            out.append([])
        if out:
            out[-1].append((keyword, rest))
    return out


def exec_form(rest: str) -> list[str]:
    """A JSON-array instruction argument (ENTRYPOINT, CMD)."""
    value = yaml.safe_load(rest)  # JSON is YAML
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


def image_env() -> dict[str, str]:
    """The runtime stage's ENV."""
    env: dict[str, str] = {}
    for keyword, rest in stages()[-1]:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc["kind"] == kind]


# ---- the command line -----------------------------------------------------------------------


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """Exactly ``env`` as the MESHSTORE_ settings of the process (the container's)."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("MESHSTORE_")]:
        del os.environ[key]
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def parse(argv: list[str], env: Mapping[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """(command name, its parsed parameters) of ``meshstore ARGV``, as the CLI parses it
    in a container with ``env``; click.UsageError if it would not start."""
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    name, *rest = argv
    with environment(env or {}):
        ctx = group.make_context("meshstore", [name])
        command = group.get_command(ctx, name)
        if command is None:
            raise click.UsageError(f"no such command {name!r}")
        sub = command.make_context(name, rest, parent=ctx)
    return name, sub.params


def test_parse_refuses_a_command_line_that_would_not_start() -> None:
    """The check the deployment tests rely on: a bad flag or value is an error here."""
    assert parse(["serve", "--peer-dns", "mesh:50051"])[1]["peer_dns"] == ("mesh:50051",)
    for bad in (["serve", "--no-such-flag"], ["serve", "--port", "seventy"], ["serve", "--metrics-port", "70000"],
                ["no-such-command"]):
        with pytest.raises(click.UsageError):
            parse(bad)
    with pytest.raises(click.UsageError):
        parse(["serve"], {"MESHSTORE_PORT": "not-a-port"})


# ---- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_builds_the_wheel_in_one_stage_and_installs_it_in_a_slim_runtime() -> None:
    builder, runtime = stages()
    name = builder[0][1].split()[-1]
    assert builder[0][1].split()[-2].upper() == "AS"
    assert any(k == "RUN" and "maturin build --release" in rest for k, rest in builder)
    assert runtime[0][1].startswith("python:${PYTHON_VERSION}-slim")
    args = dict(rest.split("=", 1) for k, rest in dockerfile() if k == "ARG")
    assert args["PYTHON_VERSION"] == "3.11"
    assert any(k == "COPY" and rest.startswith(f"--from={name} ") for k, rest in runtime)
    assert any(k == "RUN" and "pip install" in rest and ".whl" in rest for k, rest in runtime)
    assert not any(k == "RUN" and ("cargo" in rest or "maturin" in rest) for k, rest in runtime)


def test_dockerfile_copies_what_exists_and_what_the_wheel_build_reads() -> None:
    copied = set()
    for keyword, rest in dockerfile():
        if keyword == "COPY" and not rest.startswith("--from="):
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                copied.add(source)
    # The build context (the repository root) is everything but what the ignore file
    # lets through: "*", then one "!path" per path the image needs.
    ignore = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*" and copied <= {line[1:] for line in ignore if line.startswith("!")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"Cargo.toml", "Cargo.lock", "build.rs", "pyproject.toml", "proto", "rust", "python"}
    needed.update(project["project"].get("license-files", []))
    if isinstance(project["project"].get("readme"), str):
        needed.add(project["project"]["readme"])
    assert needed <= copied


def test_the_image_runs_as_a_non_root_user_and_checks_its_health() -> None:
    runtime = stages()[-1]
    users = [rest for k, rest in runtime if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    checks = [rest for k, rest in runtime if k == "HEALTHCHECK"]
    assert len(checks) == 1 and "--interval=" in checks[0]
    command = checks[0].split(" CMD ", 1)[1].split(">")[0]
    argv = shlex.split(command)
    assert argv[0] == "meshstore"
    name, params = parse(argv[1:], image_env())
    assert name == "stats" and params["store"] == "127.0.0.1:50051"


def test_the_entry_point_is_the_wheels_console_script_and_the_default_command_serves() -> None:
    runtime = stages()[-1]
    entrypoint = exec_form(next(rest for k, rest in runtime if k == "ENTRYPOINT"))
    cmd = exec_form(next(rest for k, rest in runtime if k == "CMD"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["meshstore"] and scripts["meshstore"] == "meshstore.cli:main"
    import meshstore.cli

    assert callable(meshstore.cli.main)
    name, params = parse(cmd, image_env())
    assert name == "serve"
    assert params["host"] == "0.0.0.0" and params["data_dir"] == DATA_DIR and not params["in_memory"]
    assert any(k == "VOLUME" and DATA_DIR in rest for k, rest in runtime)
    exposed = {int(p) for k, rest in runtime if k == "EXPOSE" for p in rest.split()}
    assert {params["port"], 8080, 9100} <= exposed


# ---- compose --------------------------------------------------------------------------------


def test_compose_runs_a_three_node_mesh_each_with_its_volume() -> None:
    spec = compose()
    services = spec["services"]
    nodes = {name: s for name, s in services.items() if s["command"][0] == "serve"}
    assert len(nodes) == 3
    node_ids = set()
    for name, service in nodes.items():
        env = {**image_env(), **service.get("environment", {})}
        command, params = parse(service["command"], env)
        node_ids.add(params["node_id"])
        # Every node finds the others under one name all of them carry.
        (dns,) = params["peer_dns"]
        alias, port = dns.rsplit(":", 1)
        assert alias in service["networks"]["default"]["aliases"] and int(port) == params["port"]
        (volume,) = service["volumes"]
        source, target = volume.split(":")
        assert target == params["data_dir"] and source in spec["volumes"]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    assert len(node_ids) == 3  # every node of a mesh has its own id
    assert len({s["volumes"][0].split(":")[0] for s in nodes.values()}) == 3


def test_compose_runs_the_pipeline_against_node_a_once_it_is_healthy() -> None:
    services = compose()["services"]
    pipeline = {"sensor-sim", "radar-sim", "classifier", "task-manager", "fusion"}
    assert pipeline <= set(services)
    for name in pipeline:
        service = services[name]
        command, params = parse(service["command"], {**image_env(), **service["environment"]})
        assert command == name and params["store"] == "node-a:50051"
        assert service["depends_on"]["node-a"]["condition"] == "service_healthy"
    a = parse(services["node-a"]["command"], image_env())[1]
    assert f"127.0.0.1:{a['http_port']}:{a['http_port']}" in services["node-a"]["ports"]  # not on the network
    sims = [parse(services[s]["command"])[1] for s in ("sensor-sim", "radar-sim")]
    assert sims[0]["seed"] == sims[1]["seed"] and sims[0]["count"] == sims[1]["count"]  # one ground truth


# ---- Kubernetes -----------------------------------------------------------------------------


def test_k8s_statefulset_keeps_each_nodes_data_dir_on_its_own_volume() -> None:
    (sts,) = of_kind("StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["meshstore"]
    name, params = parse(container["args"], {**image_env(), **{e["name"]: e.get("value", "") for e in
                                                                container.get("env", [])}})
    assert name == "serve" and params["host"] == "0.0.0.0"
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[params["data_dir"]] in claims
    # A stable node id per pod: its name.
    assert params["node_id"] == "$(POD_NAME)"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    security = {**pod["securityContext"], **container["securityContext"]}
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["allowPrivilegeEscalation"] is False


def test_k8s_nodes_find_each_other_through_the_headless_service() -> None:
    (sts,) = of_kind("StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    params = parse(container["args"], image_env())[1]
    headless = [s for s in of_kind("Service") if s["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == [sts["spec"]["serviceName"]]
    service = headless[0]
    (dns,) = params["peer_dns"]
    host, port = dns.rsplit(":", 1)
    assert host == service["metadata"]["name"] and int(port) == params["port"]
    assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_k8s_probes_ask_the_grpc_health_service_and_prometheus_finds_the_metrics() -> None:
    (sts,) = of_kind("StatefulSet")
    template = sts["spec"]["template"]
    (container,) = template["spec"]["containers"]
    params = parse(container["args"], image_env())[1]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == params["port"], probe
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == params["metrics_port"] == 9100
    ports = {p["containerPort"] for p in container["ports"]}
    assert {params["port"], params["http_port"], params["metrics_port"]} <= ports


def test_k8s_disruption_budget_covers_the_mesh() -> None:
    (sts,) = of_kind("StatefulSet")
    (pdb,) = of_kind("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
