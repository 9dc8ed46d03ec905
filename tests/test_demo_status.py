"""The demo's status line and live table read counters and a coalesced, projected watch
(``Picture``, ``Gauges`` in meshstore.demo.pipeline), never a list of every track per
refresh; and they show writes/s, ticks skipped, the share classified and each service's
lag p50/p99.
"""

from __future__ import annotations

import asyncio
import io
import re
import sys
import time
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from meshstore.components import APPROVAL, CLASSIFICATION, FUSION, SOURCE, TASK, THREAT, make_entity
from meshstore.demo import pipeline
from meshstore.demo.pipeline import DemoConfig, Gauges, Picture, run_demo, summarize
from meshstore.pb import entity_pb2 as pb
from meshstore.services import Service
from meshstore.services.radar_sim import RadarSim
from meshstore.services.scenario import Scenario
from meshstore.services.sensor_sim import SensorSim
from meshstore.store import Store

pytestmark = pytest.mark.timeout(120)

TRACK = pb.ENTITY_TYPE_TRACK
STATUS = re.compile(r"\[\s*[\d.]+s\] tracks=(\d+) classified=(\d+) .* · (\d+) writes/s, (\d+) of (\d+) ticks skipped, "
                    r"(\d+)% of targets classified · lag p50/p99 ms: (.*)")


def eo(i: int, lat: float, **components: Any) -> pb.Entity:
    return make_entity(f"eo-{i}", TRACK, position=pb.PositionComponent(lat=lat, lon=1.0),
                       source=pb.SourceComponent(sensor_id="eo-1", sensor_type="eo"), **components)


def fill(store: Store, lat: float) -> None:
    """Three EO tracks (two classified, one pending), a radar plot and a fused track."""
    store.put_many([
        eo(0, lat, classification=pb.ClassificationComponent(label="mover", confidence=0.9),
           threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_LOW), task=pb.TaskComponent(state="investigate")),
        eo(1, lat, classification=pb.ClassificationComponent(label="very-fast-mover", confidence=0.9),
           threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_HIGH), task=pb.TaskComponent(state="track"),
           approval=pb.ApprovalComponent(state=pb.APPROVAL_STATE_PENDING)),
        eo(2, lat),
        make_entity("radar-0", TRACK, position=pb.PositionComponent(lat=lat, lon=1.0),
                    source=pb.SourceComponent(sensor_id="radar-1", sensor_type="radar")),
        make_entity("fused-x", TRACK, position=pb.PositionComponent(lat=lat, lon=1.0),
                    fusion=pb.FusionComponent(source_ids=["eo-0", "radar-0"], fused_lat=lat, confidence=0.9)),
    ])


def test_the_watched_picture_counts_what_one_list_counts(store: Store) -> None:
    picture = Picture.follow(store, interval=0.0)
    fill(store, 50.0)
    picture.catch_up()
    assert picture.summary(store.seq) == summarize(store)
    s = picture.summary(store.seq)
    assert (s.tracks, s.eo, s.radar, s.classified, s.fused) == (4, 3, 1, 2, 1)
    assert s.approvals["PENDING"] == 1 and s.threats == {"LOW": 1, "HIGH": 1}

    # A sensor's write changes nothing the picture shows: the track is neither decoded
    # nor unpacked again.
    entity, threat = picture.tracks["eo-1"].entity, picture.tracks["eo-1"].part(THREAT)
    store.put(eo(1, 50.5))
    picture.catch_up()
    assert picture.tracks["eo-1"].entity is entity and picture.tracks["eo-1"].part(THREAT) is threat
    # Nor is a fusion pass that moves a fused track: the picture shows only that it is fused.
    fused = picture.tracks["fused-x"].entity
    store.put(make_entity("fused-x", fusion=pb.FusionComponent(source_ids=["eo-0", "radar-0"], fused_lat=50.5)))
    picture.catch_up()
    assert picture.tracks["fused-x"].entity is fused
    # The threat and the approval change, tracks go: the picture and its counts follow.
    store.put(make_entity("eo-1", threat=pb.ThreatComponent(level=pb.THREAT_LEVEL_MEDIUM),
                          approval=pb.ApprovalComponent(state=pb.APPROVAL_STATE_APPROVED)))
    store.delete("radar-0")
    store.delete("eo-0")
    picture.catch_up()
    assert picture.tracks["eo-1"].part(THREAT).level == pb.THREAT_LEVEL_MEDIUM
    assert "radar-0" not in picture.tracks and "eo-0" not in picture.tracks
    s = picture.summary(store.seq)
    assert s == summarize(store)
    assert (s.tracks, s.eo, s.radar, s.classified, s.fused) == (2, 2, 0, 1, 1)
    assert (s.threats, s.approvals, s.tasks) == ({"MEDIUM": 1}, {"APPROVED": 1}, {"track": 1})
    picture.close()


def test_the_picture_watch_is_projected_and_coalesced(store: Store) -> None:
    fill(store, 50.0)
    picture = Picture.follow(store, interval=30.0)
    picture.catch_up()
    for k in range(20):  # twenty sensor writes to every track within the interval
        fill(store, 50.0 + k / 1000)
    picture.catch_up()
    held = picture._watcher.stats()
    assert held["delivered"] == 5  # the first state of each track; the rest is held, coalesced
    # Projected on what the picture reads: no position.
    assert set(picture.tracks["eo-0"].entity.components) == {SOURCE, CLASSIFICATION, THREAT, TASK}
    assert set(pipeline.PICTURE_KEYS) == {SOURCE, CLASSIFICATION, THREAT, TASK, APPROVAL, FUSION}
    picture.close()


def test_gauges_read_writes_per_second_ticks_and_lags_from_counters(store: Store) -> None:
    scenario = Scenario(seed=1, count=4)
    eo_sim, radar_sim = SensorSim(scenario=scenario), RadarSim(scenario=scenario)
    eo_sim.counters.update(ticks=10, ticks_skipped=2)
    radar_sim.counters.update(ticks=12)
    answering = Service()
    answering.name = "classifier"
    now = time.time_ns()
    for ms in range(1, 101):
        answering.lag.since(now - ms * 1_000_000, now)
    gauges = Gauges([SimpleNamespace(store=store)], [eo_sim, radar_sim, answering, Service()], targets=4, window=0.0)
    fill(store, 50.0)
    summary = summarize(store)
    reading = gauges.read(summary)
    assert reading.writes_per_s > 0
    assert (reading.ticks, reading.ticks_skipped) == (24, 2)
    assert reading.classified_share == 0.5
    assert reading.lags == {"classifier": (51.0, 100.0)}  # only the service with samples
    assert reading.line().endswith("2 of 24 ticks skipped, 50% of targets classified · lag p50/p99 ms: classifier 51/100")
    time.sleep(0.05)
    assert gauges.read(summary).writes_per_s == 0  # nothing written since the last reading
    assert gauges.read(summary, overall=True).writes_per_s > 0


class ListCalls:
    """Counts Store.list calls by the function that made them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.callers: list[str] = []
        original = Store.list

        def counted(store: Store, *args: Any, **kwargs: Any) -> Any:
            self.callers.append(sys._getframe(1).f_code.co_qualname)
            return original(store, *args, **kwargs)

        monkeypatch.setattr(Store, "list", counted)


def run(config: DemoConfig, console: Console) -> int:
    return asyncio.run(asyncio.wait_for(run_demo(config, console), 90))


def test_status_lines_read_counters_not_a_list_and_show_lag(monkeypatch: pytest.MonkeyPatch) -> None:
    lists = ListCalls(monkeypatch)
    out = io.StringIO()
    code = run(DemoConfig(port=0, http_port=None, duration=6.0, live=False, status_every=1.0),
               Console(file=out, width=300, highlight=False))
    text = out.getvalue()
    assert code == 0, text
    statuses = [STATUS.search(line) for line in text.splitlines() if line.startswith("[")]
    assert len(statuses) >= 4 and all(statuses), text
    assert lists.callers == ["Picture.of"]  # the final summary's one list; no status line lists
    last = statuses[-1]
    assert int(last.group(1)) == 24 and int(last.group(3)) > 0  # tracks, writes/s
    assert int(last.group(5)) > 0 and int(last.group(4)) <= int(last.group(5))  # ticks skipped of ticks
    assert re.search(r"classifier \d+/\d+", last.group(7)), last.group(0)
    flat = " ".join(text.split())
    assert "classified │ 12 (100% of targets)" in flat
    assert re.search(r"classifier lag p50 / p99 │ \d+ / \d+ ms", flat)
    assert re.search(r"sensor ticks skipped │ \d+ of \d+", flat)
    assert re.search(r"pipeline: \d+ writes/s, \d+ of \d+ ticks skipped, 100% of targets classified · lag p50/p99 ms: "
                     r".*classifier \d+/\d+", flat)


def test_the_live_table_reads_the_picture_and_only_the_rows_it_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    lists = ListCalls(monkeypatch)
    gets: list[str] = []
    original_get = Store.get

    def counted_get(store: Store, entity_id: str) -> pb.Entity:
        gets.append(entity_id)
        return original_get(store, entity_id)

    monkeypatch.setattr(Store, "get", counted_get)
    out = io.StringIO()
    config = DemoConfig(port=0, http_port=None, duration=4.0, live=True, tracks=40)
    code = run(config, Console(file=out, width=250, force_terminal=True, color_system=None))
    text = out.getvalue()
    assert code == 0, text
    assert lists.callers == ["Picture.of"]
    frames = config.duration / config.refresh + 2
    # Per frame: the rows shown, their fused tracks and the first 20 fused tracks.
    assert 0 < len(gets) <= frames * (2 * pipeline.MAX_ROWS + 20)
    assert f"showing {pipeline.MAX_ROWS}" in text and "of targets classified" in text
    assert re.search(r"eo-\d+ +│ +\d+\.\d{4} +-?\d+\.\d{4} │ +\d+ kn │", text)
