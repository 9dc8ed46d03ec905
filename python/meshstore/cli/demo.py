"""``meshstore demo``: the whole pipeline in one process (``meshstore.demo.pipeline``)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import click
import typer

from meshstore.cli.common import setup_logs

__all__ = ["register"]


def demo_cmd(
    duration: Annotated[float | None, typer.Option(
        "--duration", "-d", min=0.0, envvar="MESHSTORE_DEMO_DURATION", metavar="S",
        help="Stop after S seconds (default: run until Ctrl-C).")] = None,
    port: Annotated[int, typer.Option(
        "--port", "-p", min=0, max=65535, envvar="MESHSTORE_DEMO_PORT", show_envvar=True,
        help="Port of the demo's store on 127.0.0.1 (0: any free port). If taken, a free one "
             "is used and printed.")] = 50051,
    tracks: Annotated[int, typer.Option("--tracks", "-n", min=1, max=10_000, envvar="MESHSTORE_DEMO_TRACKS",
                                        help="Targets in the scenario (each seen by the EO sensor and the radar).")] = 12,
    rate: Annotated[float, typer.Option("--rate", min=0.1, max=100.0, envvar="MESHSTORE_DEMO_RATE",
                                        help="Sensor ticks per second.")] = 2.0,
    seed: Annotated[int, typer.Option("--seed", envvar="MESHSTORE_DEMO_SEED", help="Scenario seed.")] = 7,
    approval_timeout: Annotated[float, typer.Option(
        "--approval-timeout", min=1.0, envvar="MESHSTORE_APPROVAL_TIMEOUT", metavar="S",
        help="Seconds an intercept request waits for `meshstore approve` before TIMED_OUT.")] = 30.0,
    no_live: Annotated[bool, typer.Option(
        "--no-live", envvar="MESHSTORE_DEMO_NO_LIVE", help="Print a status line every 2 s instead of the live table: the counts, store "
                          "writes/s, sensor ticks skipped, share of targets classified, each service's lag "
                          "p50/p99.")] = False,
    nodes: Annotated[int, typer.Option(
        "--nodes", min=1, max=5, envvar="MESHSTORE_DEMO_NODES",
        help="Run the store as a mesh of this many nodes on loopback (relays between every pair); "
             "the services are spread over them and a table shows each node's view.")] = 1,
    http_port: Annotated[int, typer.Option(
        "--http-port", min=0, max=65535, envvar="MESHSTORE_DEMO_HTTP_PORT", show_envvar=True,
        help="Port of the web UI on 127.0.0.1 (0: any free port). If taken, a free one is used; the address "
             "is printed.")] = 8080,
    log_level: Annotated[str, typer.Option("--log-level", envvar="MESHSTORE_LOG_LEVEL",
                                           help="Service logs (stderr): debug, info, warning or error.")] = "warning",
) -> None:
    """Run the whole pipeline in one process: a store and its gRPC server on 127.0.0.1,
    sensor-sim, radar-sim, classifier, task-manager and fusion, with a live table of
    tracks, classification, threat, task, approval and fused tracks (refreshed twice a
    second; the counts and the choice of rows follow the services within about 3 s), and
    the web UI (a map of the same picture, printed address). Approve or deny a PENDING intercept there, or from another terminal
    with `meshstore approve ID` / `meshstore deny ID`. Under the table: store writes/s,
    sensor ticks skipped, share of targets classified and each service's lag p50/p99 (ms,
    from a sensor's write to the service's answer). Stops on Ctrl-C or after --duration
    and prints a summary with the same figures."""
    from rich.console import Console

    from meshstore.demo.pipeline import DemoConfig, run_demo

    setup_logs(log_level)
    config = DemoConfig(port=port, tracks=tracks, rate=rate, seed=seed, duration=duration, live=not no_live,
                        approval_timeout=approval_timeout, nodes=nodes, http_port=http_port)
    try:
        code = asyncio.run(run_demo(config, Console(highlight=False)))
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Adds demo to ``app``."""
    app.command("demo", short_help="Run the whole pipeline in one process, with a live table.")(demo_cmd)
