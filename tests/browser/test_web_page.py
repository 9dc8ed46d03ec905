"""The operator's page (issue 14) in a real browser, against a real node running the
pipeline (see conftest.py): tracks on the map, the track panel, approvals decided from
the page and seen in the store over gRPC, deletions, mesh health, map interaction, a
10k-track frame budget, and recovery after the node restarts.

The tests share one node and one page and run in file order; the restart is last.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import grpc
import pytest

from meshstore.components import make_entity, unpack
from meshstore.pb import entity_pb2 as pb
from meshstore.pb import store_pb2, store_pb2_grpc

pytestmark = pytest.mark.timeout(60)

WAIT_MS = 15_000  # every wait in the page is bounded by this


# ---- helpers ----------------------------------------------------------------------------


class Store:
    """Synchronous gRPC calls to the node (what an operator's other tools would do)."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = store_pb2_grpc.EntityStoreServiceStub(self.channel)

    def create_track(self, entity_id: str, lat: float, lon: float, speed: float | None = None,
                     heading: float = 90.0) -> None:
        components = {"position": pb.PositionComponent(lat=lat, lon=lon),
                      "source": pb.SourceComponent(sensor_id="test", sensor_type="eo")}
        if speed is not None:
            components["velocity"] = pb.VelocityComponent(speed=speed, heading=heading)
        entity = make_entity(entity_id, pb.ENTITY_TYPE_TRACK, **components)
        self.stub.CreateEntity(store_pb2.CreateEntityRequest(entity=entity), timeout=5, wait_for_ready=True)

    def get(self, entity_id: str) -> pb.Entity:
        return self.stub.GetEntity(store_pb2.GetEntityRequest(id=entity_id), timeout=5)

    def approval(self, entity_id: str) -> int | None:
        approval = unpack(self.get(entity_id), "approval", pb.ApprovalComponent)
        return None if approval is None else approval.state

    def delete(self, entity_id: str) -> None:
        self.stub.DeleteEntity(store_pb2.DeleteEntityRequest(id=entity_id), timeout=5)

    def close(self) -> None:
        self.channel.close()


def eventually(check, timeout: float = 10.0, interval: float = 0.1, what: str = "condition", page=None):
    """Polls ``check`` until truthy. With ``page``, waits through it (Playwright's sync API
    only runs route handlers and other callbacks while it is called)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s (last: {value!r})")
        if page is not None:
            page.wait_for_timeout(interval * 1000)
        else:
            time.sleep(interval)


def wait_js(page, expression: str, arg=None, timeout: int = WAIT_MS):
    """Waits for a JS expression (a function body's value, with ``arg``) to be truthy; returns it."""
    return page.wait_for_function(f"(arg) => {expression}", arg=arg, timeout=timeout).json_value()


def track_count(page) -> int:
    return int(page.text_content("#track-count"))


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_store(pipeline) -> Iterator[Store]:
    s = Store(pipeline.grpc)
    yield s
    s.close()


@pytest.fixture(scope="module")
def page_errors() -> list[str]:
    return []


@pytest.fixture(scope="module")
def page(browser, pipeline, page_errors):
    context = browser.new_context(viewport={"width": 1400, "height": 850})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.goto(pipeline.url, wait_until="load")
    yield page
    context.close()


@pytest.fixture(autouse=True)
def _no_page_errors(page_errors) -> Iterator[None]:
    yield
    assert not page_errors, f"uncaught errors in the page: {page_errors}"


# ---- tests ------------------------------------------------------------------------------


def test_tracks_appear_on_the_map(page, screenshot) -> None:
    wait_js(page, "window.meshstore && window.meshstore.connected && window.meshstore.tracks.size >= 40")
    assert page.get_attribute("#status", "data-state") == "live"
    assert page.text_content("#status").strip() == "live"
    # the pipeline's three kinds of track: EO (sensor-sim), radar plots, fused
    wait_js(page, """(() => {
        const es = [...window.meshstore.tracks.values()];
        return es.some(e => e.source && e.source.sensor_type === 'eo' && e.threat)
            && es.some(e => e.source && e.source.sensor_type === 'radar')
            && es.some(e => e.fusion && e.fusion.source_ids.length >= 2);
    })()""")
    assert track_count(page) >= 40
    state = page.evaluate("({frames: meshstore.frames, seq: meshstore.seq, w: document.querySelector('#map').width})")
    assert state["frames"] > 0 and state["seq"] > 0 and state["w"] > 0
    # the canvas really has something drawn on it: track colours on the dark background
    colours = page.evaluate("""(() => {
        const c = document.querySelector('#map');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const seen = new Set();
        for (let i = 0; i < d.length; i += 4) if (d[i] > 200 || d[i + 1] > 150) seen.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]);
        return seen.size;
    })()""")
    assert colours > 5
    assert page.text_content("#seq").strip() != "\u2014"
    screenshot(page, "01-tracks")


def test_clicking_a_track_on_the_map_opens_its_panel(page, pipeline) -> None:
    # an EO track, clicked where the map draws it (clear of the zoom buttons and the edges)
    target = page.evaluate("""(() => {
        const c = document.querySelector('#map');
        for (const e of meshstore.tracks.values()) {
            if (e.source && e.source.sensor_type === 'eo' && e.position) {
                const [x, y] = meshstore.project(e.position.lat, e.position.lon);
                if (x > 60 && y > 60 && x < c.clientWidth - 120 && y < c.clientHeight - 60) return {id: e.id, x, y};
            }
        }
        return null;
    })()""")
    assert target is not None
    page.click("#map", position={"x": target["x"], "y": target["y"]})
    panel = page.locator("#panel")
    # the EO track, not its radar plot or fused track drawn around it on the same spot
    wait_js(page, "document.querySelector('#panel').dataset.id === arg", target["id"])
    # every component, decoded, with its version and origin node
    keys = panel.locator("table.components tbody tr").evaluate_all("rows => rows.map(r => r.dataset.key)")
    assert "position" in keys and "source" in keys
    position = panel.locator("tr[data-key=position]")
    assert re.search(r"lat: 5\d\.\d+", position.locator("td.value").text_content())
    assert re.search(r"#\d+ \d\d:\d\d:\d\d\.\d{3}", position.locator("td.version").text_content())
    assert position.locator("td.origin").text_content().strip() == pipeline.node_id
    assert "no siblings" in panel.text_content()


def test_the_panel_lists_siblings_of_concurrent_writes(page, screenshot) -> None:
    """A single node holds no siblings: the detail view of a mesh replica with two
    concurrent writes to `threat` is served to the page by a route (docs/http.md's shape)."""
    detail = {
        "id": "contested-1", "type": "TRACK", "position": {"lat": 50.5, "lon": 0.1, "alt": 0.0},
        "velocity": None, "threat": "HIGH", "classification": None, "task": None, "approval": None,
        "source": {"sensor_id": "eo-1", "sensor_type": "eo"}, "fusion": None, "expires_at": None,
        "updated_at": "2026-12-02T10:00:01.503Z", "origin_node": "node-b",
        "components": {
            "threat": {"type_url": "type.googleapis.com/entity.v1.ThreatComponent",
                       "value": {"level": "THREAT_LEVEL_HIGH"}, "bytes": 2},
            "mystery": {"type_url": "type.googleapis.com/acme.Unknown", "value": None, "bytes": 7},
        },
        "versions": {
            "threat": {"node": "node-b", "physical_ns": 1796205601503000000, "logical": 0,
                       "incarnation": "00000000000000ab", "counter": 12, "concurrent": 1},
            "mystery": {"node": "node-a", "physical_ns": 1796205600000000000, "logical": 2,
                        "incarnation": "00000000000000cd", "counter": 3, "concurrent": 0},
        },
        "siblings": [{"key": "threat", "node": "node-a", "incarnation": "00000000000000cd", "counter": 9,
                      "value": {"level": "THREAT_LEVEL_LOW"}}],
    }
    def serve(route) -> None:
        route.fulfill(status=200, content_type="application/json", body=json.dumps(detail))

    page.route("**/api/entities/contested-1", serve)
    try:
        page.evaluate("meshstore.select('contested-1')")
        wait_js(page, "document.querySelector('#panel').dataset.id === 'contested-1'")
        panel = page.locator("#panel")
        threat = panel.locator("table.components tr[data-key=threat]")
        assert threat.locator("td.value").text_content() == "level: THREAT_LEVEL_HIGH"
        assert "#12" in threat.locator("td.version").text_content()
        assert "(1 concurrent)" in threat.locator("td.version").text_content()
        assert threat.locator("td.origin").text_content() == "node-b"
        assert "not decoded" in panel.locator("tr[data-key=mystery] td.value").text_content()
        assert "1 concurrent write pending" in panel.text_content()
        sibling = panel.locator("table.siblings tr.sibling")
        assert sibling.count() == 1
        assert sibling.locator("td.key").text_content() == "threat"
        assert sibling.locator("td.value").text_content() == "level: THREAT_LEVEL_LOW"
        assert sibling.locator("td.origin").text_content() == "node-a"
        assert "#9" in sibling.locator("td.version").text_content()
        screenshot(page, "02-panel-siblings")
    finally:
        page.unroute("**/api/entities/contested-1", serve)


def test_a_high_track_is_pending_and_approve_decides_it(page, grpc_store, screenshot) -> None:
    # outside the scenario's box (no radar plot to fuse with), fast: the classifier says HIGH
    grpc_store.create_track("intruder-1", lat=51.25, lon=0.5, speed=550.0, heading=200.0)
    row = page.locator("#pending li[data-id='intruder-1']")
    row.wait_for(state="visible")
    assert grpc_store.approval("intruder-1") == pb.APPROVAL_STATE_PENDING
    # a live countdown towards TIMED_OUT (the task-manager's timeout is 60 s)
    first = row.locator(".countdown").text_content()
    assert re.fullmatch(r"[01]:\d\d", first), first
    assert 40 <= int(first[0]) * 60 + int(first[2:]) <= 60
    wait_js(page, "document.querySelector(\"#pending li[data-id='intruder-1'] .countdown\").textContent !== arg", first)
    # oldest request first
    ids = page.locator("#pending li[data-id]").evaluate_all("els => els.map(e => e.dataset.id)")
    requested = page.evaluate("(ids) => ids.map(id => Date.parse(meshstore.tracks.get(id).approval.requested_at))", ids)
    assert requested == sorted(requested)
    row.locator(".id").click()
    wait_js(page, "document.querySelector('#panel').dataset.id === 'intruder-1'")
    screenshot(page, "03-pending")

    row.locator("button.approve").click()
    eventually(lambda: grpc_store.approval("intruder-1") == pb.APPROVAL_STATE_APPROVED, what="APPROVED in the store")
    row.wait_for(state="detached")
    # the task-manager reacts to the decision: intercept
    eventually(lambda: unpack(grpc_store.get("intruder-1"), "task", pb.TaskComponent).state == "intercept",
               what="task intercept")
    wait_js(page, "(meshstore.tracks.get('intruder-1') || {}).approval?.state === 'APPROVED'")


def test_a_failed_decision_is_shown_inline(page, grpc_store) -> None:
    grpc_store.create_track("intruder-2", lat=51.3, lon=-0.5, speed=600.0)
    row = page.locator("#pending li[data-id='intruder-2']")
    row.wait_for(state="visible")

    def refuse(route) -> None:
        route.fulfill(status=409, content_type="application/json",
                      body='{"error": "no pending approval on entity \'intruder-2\' (test)"}')

    page.route("**/api/entities/intruder-2/deny", refuse)
    try:
        row.locator("button.deny").click()
        error = row.locator(".error")
        error.wait_for(state="visible")
        assert "deny failed: no pending approval" in error.text_content()
        assert row.locator("button.deny").is_enabled()  # the operator can try again
    finally:
        page.unroute("**/api/entities/intruder-2/deny", refuse)
    assert grpc_store.approval("intruder-2") == pb.APPROVAL_STATE_PENDING
    # and for real: deny
    row.locator("button.deny").click()
    eventually(lambda: grpc_store.approval("intruder-2") == pb.APPROVAL_STATE_DENIED, what="DENIED in the store")
    row.wait_for(state="detached")


def test_a_deleted_track_disappears(page, grpc_store) -> None:
    grpc_store.create_track("doomed-1", lat=49.8, lon=0.0)
    wait_js(page, "meshstore.tracks.has('doomed-1')")
    page.evaluate("meshstore.select('doomed-1')")
    wait_js(page, "document.querySelector('#panel').dataset.id === 'doomed-1'")
    grpc_store.delete("doomed-1")
    wait_js(page, "!meshstore.tracks.has('doomed-1')")
    page.locator("#panel p.deleted", has_text="doomed-1 was deleted").wait_for(state="visible")


def test_the_mesh_panel_shows_the_node_and_its_links(page, pipeline) -> None:
    mesh = page.locator("#mesh")
    mesh.locator(f"text={pipeline.node_id}").first.wait_for(state="visible")
    peer = mesh.locator(f"tr[data-peer='{pipeline.dead_peer}']")
    peer.wait_for(state="visible")
    assert peer.locator("td").nth(1).text_content() == "down"  # nothing listens there
    assert "0/1 peers up" in mesh.text_content()
    assert pipeline.grpc in page.text_content("#node-id")


def test_pan_zoom_and_fit(page) -> None:
    view = lambda: page.evaluate("({...meshstore.view})")  # noqa: E731
    before = view()
    page.click("#zoom-in")
    assert view()["scale"] == pytest.approx(before["scale"] * 1.6)
    page.click("#zoom-out")
    page.click("#zoom-out")
    assert view()["scale"] == pytest.approx(before["scale"] / 1.6)
    box = page.locator("#map").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -300)
    wait_js(page, "meshstore.view.scale > arg", before["scale"] / 1.6 * 1.1)
    at = view()
    page.mouse.move(box["x"] + 300, box["y"] + 300)
    page.mouse.down()
    page.mouse.move(box["x"] + 400, box["y"] + 350, steps=5)
    page.mouse.up()
    moved = view()
    assert moved["lon"] < at["lon"] and moved["lat"] > at["lat"]  # dragged right and down
    page.click("#fit")
    # every track with a position is on screen again
    assert page.evaluate("""(() => {
        const c = document.querySelector('#map');
        for (const e of meshstore.tracks.values()) {
            if (!e.position) continue;
            const [x, y] = meshstore.project(e.position.lat, e.position.lon);
            if (x < 0 || y < 0 || x > c.clientWidth || y > c.clientHeight) return false;
        }
        return true;
    })()""")


def test_ten_thousand_tracks_at_one_hertz_stay_smooth(browser, pipeline, screenshot) -> None:
    """10k tracks, each updated once a second (in ten batches a second, as the feed sends
    them): every batch is drawn (one frame per batch, not per event), the browser keeps
    producing frames, and applying plus drawing costs a fraction of the main thread.
    Measured in a page of its own, fed synthetic batches through the test hook."""
    context = browser.new_context(viewport={"width": 1400, "height": 850})
    try:
        page = context.new_page()
        page.goto(pipeline.url, wait_until="load")
        wait_js(page, "window.meshstore && window.meshstore.connected")
        result = page.evaluate("""async () => {
            const N = 10000, kinds = ['eo', 'radar', 'other'], threats = ['NONE', 'LOW', 'MEDIUM', 'HIGH', null];
            const entity = (i, t) => ({
                id: `synthetic-${i}`, type: 'TRACK',
                position: {lat: 40 + (i % 100) * 0.1 + t * 0.002, lon: -5 + Math.floor(i / 100) * 0.1, alt: 0},
                velocity: {speed: 300, heading: (i * 37) % 360}, threat: threats[i % 5],
                source: {sensor_id: 's', sensor_type: kinds[i % 3]},
                fusion: i % 10 === 0 ? {source_ids: [`synthetic-${i + 1}`, `synthetic-${i + 2}`]} : null,
                approval: i % 500 === 0 ? {state: 'PENDING', requested_at: new Date().toISOString(),
                                          timeout_seconds: 60, deadline: null} : null,
            });
            const sleep = ms => new Promise(r => setTimeout(r, ms));
            const events = [];
            for (let i = 0; i < N; i++) events.push({type: 'CREATED', id: `synthetic-${i}`, entity: entity(i, 0)});
            let t0 = performance.now();
            meshstore.apply({seq: meshstore.seq, events});
            const snapshotMs = performance.now() - t0;
            await sleep(300);
            let rafs = 0, running = true;
            const count = () => { rafs++; if (running) requestAnimationFrame(count); };
            requestAnimationFrame(count);
            const applyMs = [], drawMs = [];
            let seen = meshstore.frames, busy = 0;
            t0 = performance.now();
            for (let b = 0; b < 30; b++) {  // 3 s: every 100 ms a tenth of the tracks moves
                const t = Math.floor(b / 10) + 1, batch = [];
                for (let i = b % 10; i < N; i += 10) batch.push({type: 'UPDATED', id: `synthetic-${i}`, entity: entity(i, t)});
                const a = performance.now();
                meshstore.apply({seq: meshstore.seq, events: batch});
                applyMs.push(performance.now() - a);
                await sleep(100);
                if (meshstore.frames > seen) { drawMs.push(meshstore.drawMs); seen = meshstore.frames; }
            }
            const seconds = (performance.now() - t0) / 1000;
            running = false;
            const median = a => [...a].sort((x, y) => x - y)[a.length >> 1];
            return {n: meshstore.tracks.size, compact: meshstore.compact, snapshot: snapshotMs,
                    apply: median(applyMs), draw: median(drawMs), drawMax: Math.max(...drawMs),
                    redraws: drawMs.length, fps: rafs / seconds,
                    mainThread: (applyMs.reduce((x, y) => x + y, 0) + drawMs.reduce((x, y) => x + y, 0)) / (seconds * 1000),
                    pending: document.querySelectorAll('#pending li[data-id]').length};
        }""")
        screenshot(page, "04-ten-thousand")
        print(f"10k tracks at 1 Hz: {result['fps']:.0f} frames/s, {result['redraws']}/30 batches drawn, "
              f"apply {result['apply']:.1f} ms per batch (snapshot {result['snapshot']:.0f} ms), "
              f"draw {result['draw']:.1f} ms (max {result['drawMax']:.1f} ms), main thread {result['mainThread']:.0%}, "
              f"compact={result['compact']}")
        assert result["n"] >= 10_000 and result["compact"] is True
        assert result["pending"] >= 20
        assert result["redraws"] >= 25, result  # every batch drawn (give or take a timer's slip)
        assert result["fps"] >= 15, result  # software rendering on a small VM; a real GPU does far better
        assert result["draw"] < 50 and result["apply"] < 50 and result["mainThread"] < 0.6, result
    finally:
        context.close()


def test_the_feed_resumes_from_its_cursor_and_obeys_reset(browser, pipeline) -> None:
    """The live feed's protocol, scripted by a route in a page of its own: a snapshot, a
    stream that ends (the page reconnects with ?since=<its seq>), a batch, then `reset` +
    a fresh snapshot that replaces everything the page held."""
    track = lambda i, lat: {"id": i, "type": "TRACK", "position": {"lat": lat, "lon": 0.0, "alt": 0.0},  # noqa: E731
                            "threat": "LOW", "source": {"sensor_id": "s", "sensor_type": "eo"}}
    script = [
        (None, "id: 100\nevent: snapshot\ndata: " + json.dumps({"seq": 100, "entities": [track("a", 50), track("b", 51)]})),
        ("100", "id: 104\nevent: batch\ndata: " + json.dumps({"seq": 104, "events": [
            {"type": "DELETED", "id": "a", "entity": None},
            {"type": "CREATED", "id": "c", "entity": track("c", 52)},
            {"type": "UPDATED", "id": "b", "entity": track("b", 51.5)}]})),
        ("104", "event: reset\ndata: " + json.dumps({"reason": "cursor 104 is ahead of the store's seq 7", "seq": 7})
         + "\n\nid: 7\nevent: snapshot\ndata: " + json.dumps({"seq": 7, "entities": [track("z", 49)]})),
    ]
    asked: list[str | None] = []
    held: list = []  # the reconnection after the batch waits until the test has looked

    def respond(route, step: int) -> None:
        body = (script[step][1] if step < len(script) else ": heartbeat") + "\n\n"
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
                      body=body)

    def feed(route) -> None:
        since = re.search(r"[?&]since=(\d+)", route.request.url)
        asked.append(since and since.group(1))
        if len(asked) == 3:
            held.append(route)
        else:
            respond(route, len(asked) - 1)

    context = browser.new_context()
    try:
        page = context.new_page()
        page.route("**/api/events*", feed)
        page.goto(pipeline.url, wait_until="load")
        # snapshot, then (the stream ended) a resumed stream from seq 100 with one batch
        wait_js(page, "meshstore.seq === 104 && meshstore.tracks.has('c') && !meshstore.tracks.has('a')")
        assert page.evaluate("meshstore.tracks.get('b').position.lat") == 51.5
        assert asked[:2] == [None, "100"]
        # the stream ended again: the page says so and asks to resume from 104
        wait_js(page, "document.querySelector('#status').dataset.state === 'reconnecting'")
        eventually(lambda: len(held) == 1, what="a reconnection", page=page)
        assert asked[2] == "104"
        assert sorted(page.evaluate("[...meshstore.tracks.keys()]")) == ["b", "c"]
        respond(held[0], 2)  # reset: the cursor means nothing here; a fresh snapshot follows
        wait_js(page, "meshstore.seq === 7 && meshstore.tracks.has('z')")
        assert sorted(page.evaluate("[...meshstore.tracks.keys()]")) == ["z"]
        wait_js(page, "document.querySelector('#track-count').textContent === '1'")
        eventually(lambda: len(asked) >= 4, what="a reconnection after the reset", page=page)
        assert asked[3] == "7"
    finally:
        context.close()


def test_the_page_recovers_after_the_node_restarts(page, pipeline, grpc_store, screenshot) -> None:
    wait_js(page, "meshstore.connected")
    seq_before = page.evaluate("meshstore.seq")
    pipeline.stop_node()
    wait_js(page, "document.querySelector('#status').dataset.state === 'reconnecting'")
    assert page.text_content("#status").strip() == "reconnecting"
    assert page.evaluate("meshstore.connected") is False
    pipeline.restarts += 1
    pipeline.start_node()
    wait_js(page, "document.querySelector('#status').dataset.state === 'live'", timeout=20_000)
    assert page.text_content("#status").strip() == "live"
    # the tracks are back, and new changes flow again (the sims reconnected)
    wait_js(page, "meshstore.tracks.size >= 40 && meshstore.seq > arg", seq_before, timeout=20_000)
    assert track_count(page) >= 40
    grpc_store.create_track("after-restart", lat=49.9, lon=0.8)
    wait_js(page, "meshstore.tracks.has('after-restart')")
    screenshot(page, "05-after-restart")
