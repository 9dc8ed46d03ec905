"""The pipeline's service commands: ``meshstore sensor-sim | radar-sim | classifier |
task-manager | fusion``. ``register(app)`` adds them to a typer app (meshstore.cli does).

Each service command runs one service against ``--store`` (MESHSTORE_ADDR) until SIGINT or
SIGTERM, then stops cleanly (exit 0). If the store is down or restarts, the service
waits with backoff and resumes. Logs go to stderr (key=value lines, or JSON with
--log-json). Every flag can also come from the environment variable shown in --help, or
from the config file (meshstore.cli.config).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Annotated

import click
import typer

from meshstore.cli.common import DEFAULT_ADDR, LogJsonOpt, LogLevelOpt, StoreOpt
from meshstore.cli.common import setup_logs as _setup_logs

__all__ = ["register", "run_service"]

# Scenario (shared by sensor-sim and radar-sim: give both the same values).
CountOpt = Annotated[int, typer.Option("--count", "-n", min=0, envvar="MESHSTORE_SCENARIO_COUNT", show_envvar=True,
                                       help="Number of targets in the scenario.")]
SeedOpt = Annotated[int, typer.Option("--seed", envvar="MESHSTORE_SCENARIO_SEED", show_envvar=True,
                                      help="Scenario seed: the same seed gives the same targets in every sim.")]
RateOpt = Annotated[float, typer.Option("--rate", min=0.001, envvar="MESHSTORE_SIM_RATE", show_envvar=True,
                                        help="Ticks per second (every target is reported once per tick).")]
SpeedMinOpt = Annotated[float, typer.Option("--speed-min", min=0.0, envvar="MESHSTORE_SPEED_MIN_KTS", show_envvar=True,
                                            help="Slowest target speed, knots.")]
SpeedMaxOpt = Annotated[float, typer.Option("--speed-max", min=0.0, envvar="MESHSTORE_SPEED_MAX_KTS", show_envvar=True,
                                            help="Fastest target speed, knots.")]
MinLatOpt = Annotated[float, typer.Option("--bbox-min-lat", envvar="MESHSTORE_BBOX_MIN_LAT", show_envvar=True,
                                          help="Bounding box: southern edge (degrees).")]
MaxLatOpt = Annotated[float, typer.Option("--bbox-max-lat", envvar="MESHSTORE_BBOX_MAX_LAT", show_envvar=True,
                                          help="Bounding box: northern edge (degrees).")]
MinLonOpt = Annotated[float, typer.Option("--bbox-min-lon", envvar="MESHSTORE_BBOX_MIN_LON", show_envvar=True,
                                          help="Bounding box: western edge (degrees).")]
MaxLonOpt = Annotated[float, typer.Option("--bbox-max-lon", envvar="MESHSTORE_BBOX_MAX_LON", show_envvar=True,
                                          help="Bounding box: eastern edge (degrees).")]
EdgeOpt = Annotated[str, typer.Option("--edge", envvar="MESHSTORE_SIM_EDGE", show_envvar=True,
                                      help="At the box edges targets 'bounce' or 'wrap' around.")]
TtlOpt = Annotated[float, typer.Option("--ttl", min=0.0, envvar="MESHSTORE_SIM_TTL", show_envvar=True,
                                       help="Each report expires the track this many seconds later, so the "
                                            "tracks of a stopped sim disappear (0: never).")]


def _fail(message: str) -> None:
    raise click.UsageError(message)


def _scenario(count: int, seed: int, speed_min: float, speed_max: float, min_lat: float, max_lat: float,
              min_lon: float, max_lon: float, edge: str):
    from meshstore.services.scenario import BBox, Scenario

    try:
        return Scenario(seed=seed, count=count, bbox=BBox(min_lat, max_lat, min_lon, max_lon),
                        speed_min=speed_min, speed_max=speed_max, edge=edge)
    except ValueError as exc:
        _fail(str(exc))


def run_service(service) -> None:
    """Runs ``service`` until SIGINT/SIGTERM (a second signal exits at once)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        received: list[str] = []

        def on_signal(sig: signal.Signals) -> None:
            received.append(sig.name)
            service.event(20, "signal received: stopping", signal=sig.name)
            if len(received) == 1:
                loop.create_task(service.stop())
            else:
                raise SystemExit(130)

        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
        try:
            await service.run()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    asyncio.run(main())


# ---- commands ----------------------------------------------------------------------------


def sensor_sim_cmd(
    store: StoreOpt = DEFAULT_ADDR,
    count: CountOpt = 10,
    rate: RateOpt = 1.0,
    seed: SeedOpt = 1,
    speed_min: SpeedMinOpt = 10.0,
    speed_max: SpeedMaxOpt = 600.0,
    bbox_min_lat: MinLatOpt = 50.0,
    bbox_max_lat: MaxLatOpt = 51.0,
    bbox_min_lon: MinLonOpt = -1.0,
    bbox_max_lon: MaxLonOpt = 1.0,
    edge: EdgeOpt = "bounce",
    sensor_id: Annotated[str, typer.Option("--sensor-id", envvar="MESHSTORE_EO_SENSOR_ID", show_envvar=True,
                                           help="SourceComponent.sensor_id of the tracks.")] = "eo-1",
    id_prefix: Annotated[str | None, typer.Option("--id-prefix", envvar="MESHSTORE_EO_ID_PREFIX",
                                                  help="Track ids are PREFIX-<n> (default: eo).")] = None,
    ttl: TtlOpt = 30.0,
    log_level: LogLevelOpt = "info",
    log_json: LogJsonOpt = False,
) -> None:
    """Simulate an electro-optical sensor: COUNT targets moving by dead reckoning in the
    bounding box (bouncing or wrapping at its edges), reported RATE times a second as TRACK
    entities eo-<n> with position, velocity (knots) and source {sensor_id, sensor_type=eo},
    each tick one PublishEntities stream (messages of up to 1,024 tracks). A slow store
    slows the ticks down; a sim more than a tick behind skips to the current tick and
    warns how many it skipped (at most every 10 s). The targets are a pure function of
    the seed, count, box, speeds and time, so radar-sim with the same values observes the
    same targets."""
    from meshstore.services.sensor_sim import SensorSim

    _setup_logs(log_level, log_json)
    scenario = _scenario(count, seed, speed_min, speed_max, bbox_min_lat, bbox_max_lat, bbox_min_lon, bbox_max_lon,
                         edge)
    try:
        service = SensorSim(store, scenario, rate=rate, sensor_id=sensor_id, id_prefix=id_prefix, ttl=ttl)
    except ValueError as exc:
        _fail(str(exc))
    run_service(service)


def radar_sim_cmd(
    store: StoreOpt = DEFAULT_ADDR,
    count: CountOpt = 10,
    rate: RateOpt = 1.0,
    seed: SeedOpt = 1,
    speed_min: SpeedMinOpt = 10.0,
    speed_max: SpeedMaxOpt = 600.0,
    bbox_min_lat: MinLatOpt = 50.0,
    bbox_max_lat: MaxLatOpt = 51.0,
    bbox_min_lon: MinLonOpt = -1.0,
    bbox_max_lon: MaxLonOpt = 1.0,
    edge: EdgeOpt = "bounce",
    noise: Annotated[float, typer.Option("--noise", min=0.0, envvar="MESHSTORE_RADAR_NOISE_M", show_envvar=True,
                                         help="Position noise, metres (Gaussian standard deviation per axis).")] = 50.0,
    sensor_id: Annotated[str, typer.Option("--sensor-id", envvar="MESHSTORE_RADAR_SENSOR_ID", show_envvar=True,
                                           help="SourceComponent.sensor_id of the plots.")] = "radar-1",
    id_prefix: Annotated[str | None, typer.Option("--id-prefix", envvar="MESHSTORE_RADAR_ID_PREFIX",
                                                  help="Track ids are PREFIX-<n> (default: radar).")] = None,
    ttl: TtlOpt = 30.0,
    log_level: LogLevelOpt = "info",
    log_json: LogJsonOpt = False,
) -> None:
    """Simulate a radar observing the same targets as sensor-sim (give it the same seed,
    count, box and speeds): TRACK entities radar-<n> with a noisy position (Gaussian, NOISE
    metres; deterministic for a seed) and source {sensor_type=radar}, no velocity; published
    and paced as sensor-sim's tracks are."""
    from meshstore.services.radar_sim import RadarSim

    _setup_logs(log_level, log_json)
    scenario = _scenario(count, seed, speed_min, speed_max, bbox_min_lat, bbox_max_lat, bbox_min_lon, bbox_max_lon,
                         edge)
    try:
        service = RadarSim(store, scenario, rate=rate, noise_m=noise, sensor_id=sensor_id, id_prefix=id_prefix,
                           ttl=ttl)
    except ValueError as exc:
        _fail(str(exc))
    run_service(service)


def classifier_cmd(
    store: StoreOpt = DEFAULT_ADDR,
    low: Annotated[float, typer.Option("--low", envvar="MESHSTORE_CLASSIFIER_LOW_KTS", show_envvar=True,
                                       help="Speed (knots) from which the threat is LOW.")] = 30.0,
    medium: Annotated[float, typer.Option("--medium", envvar="MESHSTORE_CLASSIFIER_MEDIUM_KTS", show_envvar=True,
                                          help="Speed (knots) from which the threat is MEDIUM.")] = 150.0,
    high: Annotated[float, typer.Option("--high", envvar="MESHSTORE_CLASSIFIER_HIGH_KTS", show_envvar=True,
                                        help="Speed (knots) from which the threat is HIGH.")] = 400.0,
    min_interval: Annotated[float, typer.Option("--min-interval", min=0.0, envvar="MESHSTORE_CLASSIFIER_MIN_INTERVAL",
                                                show_envvar=True, metavar="S",
                                                help="Look at each track at most once per S seconds.")] = 0.0,
    log_level: LogLevelOpt = "info",
    log_json: LogJsonOpt = False,
) -> None:
    """Classify tracks by speed: watches every track (existing ones first) and writes
    classification {label, confidence} and threat {level} (NONE below --low, then LOW,
    MEDIUM, HIGH), ONLY those two keys, each against the version it read, so a newer value
    is kept rather than clobbered and sensor positions are never touched. Unchanged
    results are not written. Tracks without a velocity (radar plots) are ignored."""
    from meshstore.services.classifier import Classifier, Thresholds

    _setup_logs(log_level, log_json)
    try:
        service = Classifier(store, Thresholds(low, medium, high), min_interval=min_interval)
    except ValueError as exc:
        _fail(str(exc))
    run_service(service)


def task_manager_cmd(
    store: StoreOpt = DEFAULT_ADDR,
    approval_timeout: Annotated[float, typer.Option(
        "--approval-timeout", min=1.0, envvar="MESHSTORE_APPROVAL_TIMEOUT", show_envvar=True, metavar="S",
        help="Seconds an intercept request stays PENDING before it is TIMED_OUT.")] = 30.0,
    log_level: LogLevelOpt = "info",
    log_json: LogJsonOpt = False,
) -> None:
    """Turn threats into tasks: NONE -> idle, LOW -> investigate, MEDIUM -> track; HIGH
    requests approval (approval PENDING, task track) and becomes intercept once approved
    (`meshstore approve ID`), idle if denied (`meshstore deny ID`), TIMED_OUT (task track)
    after --approval-timeout. Each task comes with its task catalog. Timeouts live on one
    event loop; a restart rebuilds them from the pending approvals in the store."""
    from meshstore.services.task_manager import TaskManager

    _setup_logs(log_level, log_json)
    try:
        service = TaskManager(store, approval_timeout=approval_timeout)
    except ValueError as exc:
        _fail(str(exc))
    run_service(service)


def fusion_cmd(
    store: StoreOpt = DEFAULT_ADDR,
    max_distance: Annotated[float, typer.Option(
        "--max-distance", min=0.001, envvar="MESHSTORE_FUSION_MAX_DISTANCE_M", show_envvar=True, metavar="M",
        help="Tracks of different sensor types within M metres are fused.")] = 500.0,
    hysteresis: Annotated[float, typer.Option(
        "--hysteresis", min=1.0, envvar="MESHSTORE_FUSION_HYSTERESIS", show_envvar=True,
        help="A fused pair is split only beyond this multiple of --max-distance.")] = 1.5,
    sigmas: Annotated[str, typer.Option(
        "--sigma", envvar="MESHSTORE_FUSION_SIGMAS", show_envvar=True, metavar="TYPE=M,...",
        help="Position accuracy (metres, 1 sigma) per sensor type; fused positions weight "
             "each source by 1/sigma^2 (unknown types: 100 m).")] = "eo=10,radar=50",
    interval: Annotated[float, typer.Option(
        "--interval", min=0.01, envvar="MESHSTORE_FUSION_INTERVAL", show_envvar=True, metavar="S",
        help="Seconds between correlation passes (start to start; the fused track trails "
             "its sources by about this much).")] = 0.25,
    log_level: LogLevelOpt = "info",
    log_json: LogJsonOpt = False,
) -> None:
    """Fuse tracks from different sensors (source.sensor_type differs) that are within
    --max-distance, using a spatial grid (not all pairs): each group becomes a TRACK
    fused-<hash of the source ids> with fusion {source_ids, fused_lat, fused_lon,
    confidence} and a position weighted by sensor accuracy. Groups that drift apart beyond
    the hysteresis are split (the fused track deleted), and a deleted or expired source
    deletes its fused tracks at once. Non-finite positions are ignored with a warning."""
    from meshstore.services.fusion import Fusion, parse_sigmas

    _setup_logs(log_level, log_json)
    try:
        service = Fusion(store, max_distance=max_distance, hysteresis=hysteresis, sigmas=parse_sigmas(sigmas),
                         interval=interval)
    except ValueError as exc:
        _fail(str(exc))
    run_service(service)


def register(app: typer.Typer) -> None:
    """Adds sensor-sim, radar-sim, classifier, task-manager and fusion to ``app``."""
    app.command("sensor-sim", short_help="Simulate an EO sensor: the scenario's targets as tracks.")(sensor_sim_cmd)
    app.command("radar-sim", short_help="Simulate a radar: noisy plots of the same targets.")(radar_sim_cmd)
    app.command("classifier", short_help="Classify tracks by speed (classification, threat).")(classifier_cmd)
    app.command("task-manager", short_help="Threat -> task, with approval requests and timeouts.")(task_manager_cmd)
    app.command("fusion", short_help="Fuse tracks of different sensors that are close together.")(fusion_cmd)
