// meshstore: the operator's picture of one node. A live map of its tracks, the approvals
// waiting for a decision, a panel on one track and the mesh's health. Plain JS, canvas,
// no framework, no network beyond this node's /api (works offline; shipped in the wheel).
//
// How it works
// - Live data: an EventSource on api/events (docs/http.md). A stream without a cursor
//   starts with a `snapshot` message ({seq, entities: [E]}) that replaces the picture;
//   each `batch` message ({seq, events: [{type, id, entity}]}) is applied at once to
//   `tracks` (id -> E, the summary view of GET /api/entities). `reset` (our cursor is
//   too old, or from another life of the node) is followed by a fresh snapshot. On an
//   error the stream is closed and reopened with ?since=<last seq> after a backoff
//   (0.25 s doubling to 5 s), so nothing is missed and nothing is sent twice; #status
//   says connecting / live / reconnecting.
// - Drawing: events only mark the view dirty; one requestAnimationFrame draws the whole
//   map (never once per event). Tracks are grouped by colour and shape into a few Path2D
//   objects, so a frame is a handful of fill/stroke calls even at 10k tracks; with more
//   than COMPACT_LIMIT on screen the symbols shrink, strokes are hairlines and trails
//   are left out (cheap to rasterize without a GPU). Shape = sensor (disc eo, square
//   outline radar, diamond outline fused, triangle other), colour = threat (NONE grey,
//   LOW green, MEDIUM amber, HIGH red, unknown white; a fused track without one shows
//   its sources' highest), a tick along the heading, a trail of the last TRAIL_POINTS
//   positions (kept here, client-side), thin lines from a fused track to its sources,
//   a red ring on pending approvals. The view follows the tracks (fits them) until the
//   user pans or zooms; "fit" fits them again and resumes following.
// - The pending list (#pending, oldest request first) and its countdowns are refreshed
//   4 times a second; Approve / Deny POST api/entities/{id}/approve|deny and show a
//   failure inline. The panel (#panel) shows GET api/entities/{id} for the selected
//   track (every component decoded, each key's version and origin node, siblings),
//   refetched at most once a second while the track changes. #mesh polls api/mesh every
//   2 s.
//
// Test hook (tests/browser; not an API, it follows the tests): window.meshstore =
//   {tracks: Map id -> E, seq, connected, view, project(lat, lon) -> [x, y] in the
//    canvas's CSS pixels, select(id), apply(batch), replace(entities, seq) (a snapshot),
//    frames (maps drawn), drawMs (the last frame's time), compact (the last frame's mode)}.

const TRAIL_POINTS = 10;
const DEG = Math.PI / 180;
const R = 4.5; // track symbol radius, CSS px
const MIN_SCALE = 0.5, MAX_SCALE = 5e6; // px per degree of latitude
const MAX_PENDING_SHOWN = 200;
const LABEL_LIMIT = 150; // ids are drawn beside the symbols when at most this many are on screen
const COMPACT_LIMIT = 2500; // more on screen: compact symbols, no trails (see draw)
const BG = '#0b1220';
const GRID = 'rgba(120, 150, 200, 0.16)';
const GRID_TEXT = 'rgba(160, 180, 210, 0.7)';
const COLOURS = ['#8a8f98', '#3ecf5a', '#ffb300', '#ff3b30', '#ffffff']; // NONE LOW MEDIUM HIGH unknown
const THREATS = {NONE: 0, LOW: 1, MEDIUM: 2, HIGH: 3};
const CIRCLE = 0, SQUARE = 1, DIAMOND = 2, TRIANGLE = 3;

// ---- state ---------------------------------------------------------------------------

const tracks = new Map(); // id -> entity
const trails = new Map(); // id -> [lon, lat, lon, lat, ...], oldest first
const pendingIds = new Set(); // ids whose approval is PENDING
const view = {lat: 50.5, lon: 0, scale: 300}; // centre, px per degree of latitude
let seq = null;
let connected = false;
let userMoved = false; // until the user pans or zooms, the view follows the tracks
let fitted = false; // the first tracks are fitted; later the view only grows to keep them
let dirty = true, frameRequested = false, listDirty = true;
let selected = null;
let clockSkew = 0; // server time - local time, seconds (from api/pending)

const hook = {tracks, seq, connected, view, frames: 0, drawMs: 0, compact: false, project, select,
  apply: applyBatch, replace: replaceAll};
window.meshstore = hook;

const $ = (sel) => document.querySelector(sel);
const canvas = $('#map');
const ctx = canvas.getContext('2d', {alpha: false});
let W = 0, H = 0; // canvas size, CSS px

// ---- small helpers -------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const enumName = (v) => (typeof v === 'string' ? v.replace(/^(THREAT_LEVEL_|APPROVAL_STATE_|ENTITY_TYPE_)/, '') : v);
const threatOf = (e) => enumName(e.threat && typeof e.threat === 'object' ? e.threat.level : e.threat);
const threatIndex = (e) => THREATS[threatOf(e)] ?? 4;

// A fused track without a threat of its own shows its sources' highest.
function colourIndex(e) {
  const i = threatIndex(e);
  if (i !== 4 || !e.fusion || !Array.isArray(e.fusion.source_ids)) return i;
  let best = -1;
  for (const sid of e.fusion.source_ids) {
    const s = tracks.get(sid);
    const j = s ? threatIndex(s) : 4;
    if (j !== 4 && j > best) best = j;
  }
  return best < 0 ? 4 : best;
}
const approvalState = (e) => (e.approval ? enumName(e.approval.state) : null);
const finite = (v) => typeof v === 'number' && Number.isFinite(v);
const hasPos = (p) => p && finite(p.lat) && finite(p.lon);

function shapeOf(e) {
  if (e.fusion) return DIAMOND;
  const t = e.source && typeof e.source.sensor_type === 'string' ? e.source.sensor_type.toLowerCase() : '';
  if (t === 'eo') return CIRCLE;
  if (t === 'radar') return SQUARE;
  return TRIANGLE;
}

// Unix seconds from a number (seconds) or an ISO string; null otherwise.
function toSeconds(v) {
  if (finite(v)) return v;
  if (typeof v === 'string' && v) {
    const ms = Date.parse(v);
    return Number.isNaN(ms) ? null : ms / 1000;
  }
  return null;
}

function deadlineOf(e) {
  const a = e.approval;
  if (!a) return null;
  const d = toSeconds(a.deadline);
  if (d != null) return d;
  const at = toSeconds(a.requested_at);
  return at != null && finite(a.timeout_seconds) && a.timeout_seconds > 0 ? at + a.timeout_seconds : null;
}

const serverNow = () => Date.now() / 1000 + clockSkew;

function fmtLeft(s) {
  if (s == null) return '\u2014';
  if (s <= 0) return 'timing out';
  const t = Math.ceil(s);
  return `${Math.floor(t / 60)}:${String(t % 60).padStart(2, '0')}`;
}

function fmtNum(v) {
  if (!finite(v)) return v == null ? '\u2014' : String(v);
  return Number.isInteger(v) ? v.toLocaleString('en') : v.toFixed(Math.abs(v) < 10 ? 3 : 1);
}

function fmtTime(sec) {
  if (sec == null) return '\u2014';
  const d = new Date(sec * 1000);
  return d.toISOString().replace('T', ' ').replace(/\.(\d{3})Z$/, '.$1Z');
}

async function getJSON(url, init) {
  const r = await fetch(url, {cache: 'no-store', ...init});
  let body = null;
  try { body = await r.json(); } catch { /* not JSON */ }
  if (!r.ok) {
    const err = new Error((body && body.error) || `${r.status} ${r.statusText}`);
    err.status = r.status;
    throw err;
  }
  return body;
}

// ---- applying changes ----------------------------------------------------------------

function upsert(e) {
  if (!e || typeof e.id !== 'string') return;
  tracks.set(e.id, e);
  const p = e.position;
  if (hasPos(p)) {
    let tr = trails.get(e.id);
    if (!tr) trails.set(e.id, (tr = []));
    const n = tr.length;
    if (n === 0 || tr[n - 2] !== p.lon || tr[n - 1] !== p.lat) {
      tr.push(p.lon, p.lat);
      if (tr.length > 2 * TRAIL_POINTS) tr.splice(0, tr.length - 2 * TRAIL_POINTS);
    }
  }
  const wasPending = pendingIds.has(e.id);
  const isPending = approvalState(e) === 'PENDING';
  if (isPending) pendingIds.add(e.id); else pendingIds.delete(e.id);
  if (wasPending || isPending) listDirty = true;
  if (e.id === selected) panel.stale = true;
}

function remove(id) {
  tracks.delete(id);
  trails.delete(id);
  if (pendingIds.delete(id)) listDirty = true;
  if (id === selected) panel.gone(id);
}

// A snapshot: the picture becomes exactly `entities` (the trails of tracks still there go on).
function replaceAll(entities, s) {
  const keep = new Set();
  for (const e of entities || []) if (e && typeof e.id === 'string') keep.add(e.id);
  for (const id of [...tracks.keys()]) if (!keep.has(id)) remove(id);
  for (const e of entities || []) upsert(e);
  if (s != null) setSeq(s);
  listDirty = true;
  invalidate();
}

function applyBatch(batch) {
  if (!batch) return;
  for (const ev of batch.events || []) {
    if (ev.type === 'DELETED') remove(ev.id);
    else if (ev.entity) upsert(ev.entity);
    else if (ev.id) remove(ev.id);
  }
  if (batch.seq != null) setSeq(batch.seq);
  invalidate();
}

function setSeq(s) {
  seq = s;
  hook.seq = s;
  $('#seq').textContent = s == null ? '\u2014' : String(s);
}

// ---- the event stream ----------------------------------------------------------------

let source = null, attempt = 0;

function setStatus(state) {
  connected = state === 'live';
  hook.connected = connected;
  const el = $('#status');
  el.dataset.state = state;
  el.textContent = state;
}

function connect() {
  const es = new EventSource(seq == null ? 'api/events' : `api/events?since=${encodeURIComponent(seq)}`);
  source = es;
  es.onopen = () => {
    if (source !== es) return;
    attempt = 0;
    setStatus('live');
  };
  const parse = (ev) => {
    if (source !== es) return null;
    try {
      const data = JSON.parse(ev.data);
      if (data.seq == null && ev.lastEventId) data.seq = Number(ev.lastEventId);
      return data;
    } catch (err) {
      console.warn(`bad ${ev.type} message`, err);
      return null;
    }
  };
  es.addEventListener('snapshot', (ev) => {
    const data = parse(ev);
    if (!data) return;
    replaceAll(data.entities, data.seq);
    if (!connected) setStatus('live');
  });
  es.addEventListener('batch', (ev) => {
    const data = parse(ev);
    if (!data) return;
    applyBatch(data);
    if (!connected) setStatus('live');
  });
  es.addEventListener('reset', (ev) => {
    // Our cursor cannot be resumed (too old, or from another life of the node): a
    // snapshot follows on this stream; should it break first, reconnect without a cursor.
    if (source !== es) return;
    console.info('event stream reset:', ev.data);
    setSeq(null);
  });
  es.onerror = () => {
    if (source !== es) return;
    es.close();
    source = null;
    setStatus('reconnecting');
    const delay = Math.min(5000, 250 * 2 ** attempt++) * (0.75 + 0.5 * Math.random());
    setTimeout(connect, delay);
  };
}

// ---- projection and view -------------------------------------------------------------

function scales() {
  const k = view.scale;
  return {k, kx: k * Math.max(0.01, Math.cos(view.lat * DEG))};
}

function project(lat, lon) {
  const {k, kx} = scales();
  return [W / 2 + (lon - view.lon) * kx, H / 2 - (lat - view.lat) * k];
}

function unproject(x, y) {
  const {k, kx} = scales();
  return {lat: view.lat - (y - H / 2) / k, lon: view.lon + (x - W / 2) / kx};
}

const clampLat = (v) => Math.max(-85, Math.min(85, v));
const clampScale = (v) => Math.max(MIN_SCALE, Math.min(MAX_SCALE, v));

function zoomAt(x, y, factor) {
  const g = unproject(x, y);
  view.scale = clampScale(view.scale * factor);
  view.lat = clampLat(g.lat + (y - H / 2) / view.scale);
  view.lon = g.lon - (x - W / 2) / scales().kx;
  userMoved = true;
  invalidate();
}

function bounds() {
  let minLat = Infinity, maxLat = -Infinity, minLon = Infinity, maxLon = -Infinity, n = 0;
  for (const e of tracks.values()) {
    const p = e.position;
    if (!hasPos(p)) continue;
    n++;
    if (p.lat < minLat) minLat = p.lat;
    if (p.lat > maxLat) maxLat = p.lat;
    if (p.lon < minLon) minLon = p.lon;
    if (p.lon > maxLon) maxLon = p.lon;
  }
  return n ? {minLat, maxLat, minLon, maxLon, n} : null;
}

function fit(b = bounds()) {
  if (!b || !W || !H) return false;
  view.lat = clampLat((b.minLat + b.maxLat) / 2);
  view.lon = (b.minLon + b.maxLon) / 2;
  const cos = Math.max(0.01, Math.cos(view.lat * DEG));
  const dLat = Math.max(b.maxLat - b.minLat, 0.02);
  const dLon = Math.max((b.maxLon - b.minLon) * cos, 0.02);
  view.scale = clampScale(Math.min((H * 0.84) / dLat, (W * 0.84) / dLon));
  invalidate();
  return true;
}

function inView(b) {
  const m = 12; // px of margin
  const [x0, y0] = project(b.maxLat, b.minLon);
  const [x1, y1] = project(b.minLat, b.maxLon);
  return x0 >= m && y0 >= m && x1 <= W - m && y1 <= H - m;
}

// ---- drawing -------------------------------------------------------------------------

function invalidate() {
  dirty = true;
  if (!frameRequested) {
    frameRequested = true;
    requestAnimationFrame(frame);
  }
}

function resize() {
  const dpr = window.devicePixelRatio || 1;
  W = canvas.clientWidth;
  H = canvas.clientHeight;
  const w = Math.max(1, Math.round(W * dpr)), hh = Math.max(1, Math.round(H * dpr));
  if (canvas.width !== w || canvas.height !== hh) {
    canvas.width = w;
    canvas.height = hh;
  }
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
}

function frame() {
  frameRequested = false;
  if (!dirty) return;
  dirty = false;
  const t0 = performance.now();
  resize();
  const b = draw();
  $('#track-count').textContent = String(tracks.size);
  if (!userMoved && b && (!fitted || !inView(b))) {
    fitted = fit(b); // the view follows the tracks until the user takes it: drawn again next frame
  }
  hook.frames++;
  hook.drawMs = performance.now() - t0;
}

function niceStep(pxPerDeg, minPx) {
  for (let e = -5; e <= 1; e++) {
    for (const m of [1, 2, 5]) {
      const s = m * 10 ** e;
      if (s * pxPerDeg >= minPx) return s;
    }
  }
  for (const s of [15, 30, 45, 90]) if (s * pxPerDeg >= minPx) return s;
  return 90;
}

function fmtDeg(v, step, pos, neg) {
  const decimals = Math.max(0, Math.ceil(-Math.log10(step) - 1e-9));
  const a = Math.abs(v) < step / 1e3 ? 0 : v;
  return `${Math.abs(a).toFixed(decimals)}\u00b0${a > 0 ? pos : a < 0 ? neg : ''}`;
}

function drawGraticule() {
  const {k, kx} = scales();
  const tl = unproject(0, 0), br = unproject(W, H);
  ctx.lineWidth = 1;
  ctx.strokeStyle = GRID;
  ctx.fillStyle = GRID_TEXT;
  ctx.font = '10px system-ui, sans-serif';
  const path = new Path2D();
  const latStep = niceStep(k, 70);
  ctx.textAlign = 'left';
  ctx.textBaseline = 'bottom';
  for (let lat = Math.ceil(br.lat / latStep) * latStep; lat <= tl.lat; lat += latStep) {
    if (lat < -90 || lat > 90) continue;
    const y = Math.round(H / 2 - (lat - view.lat) * k) + 0.5;
    path.moveTo(0, y);
    path.lineTo(W, y);
    if (y > 24 && y < H - 30) ctx.fillText(fmtDeg(lat, latStep, 'N', 'S'), 4, y - 2); // clear of the other labels
  }
  const lonStep = niceStep(kx, 90);
  ctx.textAlign = 'center';
  ctx.textBaseline = 'top';
  for (let lon = Math.ceil(tl.lon / lonStep) * lonStep; lon <= br.lon; lon += lonStep) {
    const x = Math.round(W / 2 + (lon - view.lon) * kx) + 0.5;
    path.moveTo(x, 0);
    path.lineTo(x, H);
    const wrapped = ((((lon + 180) % 360) + 360) % 360) - 180;
    if (x > 24 && x < W - 24) ctx.fillText(fmtDeg(wrapped, lonStep, 'E', 'W'), x, 4);
  }
  ctx.stroke(path);
}

function drawScaleBar() {
  const mPerPx = 111320 / view.scale;
  const target = 120 * mPerPx;
  const pow = 10 ** Math.floor(Math.log10(target));
  const nice = [5, 2, 1].map((m) => m * pow).find((v) => v <= target) || pow;
  const px = nice / mPerPx;
  const x = 12, y = H - 14;
  ctx.strokeStyle = GRID_TEXT;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  ctx.moveTo(x, y - 5); ctx.lineTo(x, y); ctx.lineTo(x + px, y); ctx.lineTo(x + px, y - 5);
  ctx.stroke();
  ctx.fillStyle = GRID_TEXT;
  ctx.textAlign = 'left';
  ctx.textBaseline = 'bottom';
  ctx.fillText(nice >= 1000 ? `${nice / 1000} km` : `${nice} m`, x + 4, y - 2);
}

function addShape(path, shape, x, y) {
  switch (shape) {
    case CIRCLE:
      path.moveTo(x + R, y);
      path.arc(x, y, R, 0, 2 * Math.PI);
      break;
    case SQUARE: // outlined: an EO disc on the same target shows inside it
      path.rect(x - R * 1.2, y - R * 1.2, R * 2.4, R * 2.4);
      break;
    case DIAMOND: // outlined, around the sources' symbols
      path.moveTo(x, y - R * 2); path.lineTo(x + R * 2, y); path.lineTo(x, y + R * 2); path.lineTo(x - R * 2, y);
      path.closePath();
      break;
    default:
      path.moveTo(x, y - R * 1.2); path.lineTo(x + R * 1.1, y + R * 0.9); path.lineTo(x - R * 1.1, y + R * 0.9);
      path.closePath();
  }
}

// The same shapes, small and cheap to rasterize (thousands of tracks on screen).
function addCompactShape(path, shape, x, y) {
  switch (shape) {
    case CIRCLE:
      path.rect(x - 2, y - 2, 4, 4);
      break;
    case SQUARE:
      path.rect(x - 3.5, y - 3.5, 7, 7);
      break;
    case DIAMOND:
      path.moveTo(x, y - 6); path.lineTo(x + 6, y); path.lineTo(x, y + 6); path.lineTo(x - 6, y);
      path.closePath();
      break;
    default:
      path.moveTo(x, y - 3); path.lineTo(x + 3, y + 2); path.lineTo(x - 3, y + 2);
      path.closePath();
  }
}

// Draws the picture; returns the tracks' bounds (for the follow-the-tracks view).
// With more than COMPACT_LIMIT tracks on screen the symbols are smaller, strokes are
// hairlines and trails are left out: software rasterization stays fast at 10k tracks.
function draw() {
  ctx.fillStyle = BG;
  ctx.fillRect(0, 0, W, H);
  drawGraticule();
  const {k, kx} = scales();
  const ox = W / 2 - view.lon * kx, oy = H / 2 + view.lat * k; // x = ox + lon * kx, y = oy - lat * k
  const pad = 30;
  const x0 = -pad, y0 = -pad, x1 = W + pad, y1 = H + pad;
  let onScreen = 0;
  for (const e of tracks.values()) {
    const p = e.position;
    if (!hasPos(p)) continue;
    const x = ox + p.lon * kx, y = oy - p.lat * k;
    if (x >= x0 && y >= y0 && x <= x1 && y <= y1) onScreen++;
  }
  const compact = onScreen > COMPACT_LIMIT;
  const shapeOn = compact ? addCompactShape : addShape;
  const tick0 = compact ? 0 : R + 1, tick1 = compact ? 8 : R + 10;
  const shapes = Array.from({length: COLOURS.length * 4}, () => new Path2D()); // colour * 4 + shape
  const ticks = COLOURS.map(() => new Path2D());
  const trailPaths = COLOURS.map(() => new Path2D());
  const links = new Path2D();
  const rings = new Path2D();
  const labels = [[], []]; // [x, y, id, ...]: EO and other tracks first, then radar plots
  let minLat = Infinity, maxLat = -Infinity, minLon = Infinity, maxLon = -Infinity, n = 0;
  let sel = null;
  for (const [id, e] of tracks) {
    const p = e.position;
    if (!hasPos(p)) continue;
    n++;
    if (p.lat < minLat) minLat = p.lat;
    if (p.lat > maxLat) maxLat = p.lat;
    if (p.lon < minLon) minLon = p.lon;
    if (p.lon > maxLon) maxLon = p.lon;
    const x = ox + p.lon * kx, y = oy - p.lat * k;
    const ci = colourIndex(e);
    if (!compact) {
      const tr = trails.get(id);
      if (tr && tr.length >= 4) {
        const tp = trailPaths[ci];
        tp.moveTo(ox + tr[0] * kx, oy - tr[1] * k);
        for (let i = 2; i < tr.length; i += 2) tp.lineTo(ox + tr[i] * kx, oy - tr[i + 1] * k);
      }
    }
    const f = e.fusion;
    if (f && Array.isArray(f.source_ids)) {
      for (const sid of f.source_ids) {
        const s = tracks.get(sid);
        if (s && hasPos(s.position)) {
          links.moveTo(x, y);
          links.lineTo(ox + s.position.lon * kx, oy - s.position.lat * k);
        }
      }
    }
    if (x < x0 || y < y0 || x > x1 || y > y1) continue;
    const shape = shapeOf(e);
    shapeOn(shapes[ci * 4 + shape], shape, x, y);
    const v = e.velocity;
    if (v && finite(v.heading)) {
      const a = v.heading * DEG, sx = Math.sin(a), sy = -Math.cos(a);
      ticks[ci].moveTo(x + sx * tick0, y + sy * tick0);
      ticks[ci].lineTo(x + sx * tick1, y + sy * tick1);
    }
    if (pendingIds.has(id)) {
      rings.moveTo(x + R + 4, y);
      rings.arc(x, y, R + 4, 0, 2 * Math.PI);
    }
    if (id === selected) sel = [x, y];
    if (onScreen <= LABEL_LIMIT && shape !== DIAMOND && id !== selected) {
      labels[shape === SQUARE ? 1 : 0].push(x, y, id);
    }
  }
  ctx.lineWidth = 1;
  if (!compact) {
    ctx.globalAlpha = 0.4;
    trailPaths.forEach((tp, i) => { ctx.strokeStyle = COLOURS[i]; ctx.stroke(tp); });
    ctx.setLineDash([3, 3]);
  }
  ctx.globalAlpha = 0.5;
  ctx.strokeStyle = '#9ec5ff';
  ctx.stroke(links);
  ctx.setLineDash([]);
  ctx.globalAlpha = 1;
  // fused tracks and radar plots are outlines (diamond, square) around the EO tracks' discs
  ctx.lineWidth = compact ? 1 : 1.5;
  for (const shape of [DIAMOND, SQUARE]) {
    COLOURS.forEach((c, i) => { ctx.strokeStyle = c; ctx.stroke(shapes[i * 4 + shape]); });
  }
  ctx.lineWidth = 1;
  ticks.forEach((tp, i) => { ctx.strokeStyle = COLOURS[i]; ctx.stroke(tp); });
  for (const shape of [TRIANGLE, CIRCLE]) {
    COLOURS.forEach((c, i) => { ctx.fillStyle = c; ctx.fill(shapes[i * 4 + shape]); });
  }
  ctx.strokeStyle = COLOURS[3];
  ctx.lineWidth = 1.5;
  ctx.stroke(rings);
  if (labels[0].length || labels[1].length) {
    ctx.fillStyle = 'rgba(215, 222, 234, 0.75)';
    ctx.font = '10px system-ui, sans-serif';
    ctx.textAlign = 'left';
    ctx.textBaseline = 'middle';
    const placed = []; // [x0, y0, x1, y1] of the labels drawn: labels never overlap
    for (const list of labels) {
      for (let i = 0; i < list.length; i += 3) {
        const x = list[i] + R + 5, y = list[i + 1] + 8, text = list[i + 2];
        const box = [x - 2, y - 7, x + ctx.measureText(text).width + 2, y + 7];
        if (placed.some((b) => box[0] < b[2] && b[0] < box[2] && box[1] < b[3] && b[1] < box[3])) continue;
        placed.push(box);
        ctx.fillText(text, x, y);
      }
    }
  }
  if (sel) {
    ctx.strokeStyle = '#5aa9ff';
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.arc(sel[0], sel[1], R + 8, 0, 2 * Math.PI);
    ctx.stroke();
    ctx.fillStyle = '#d7deea';
    ctx.font = 'bold 11px system-ui, sans-serif';
    ctx.textAlign = 'left';
    ctx.textBaseline = 'bottom';
    ctx.fillText(selected, sel[0] + R + 10, sel[1] - 6);
  }
  drawScaleBar();
  hook.compact = compact;
  return n ? {minLat, maxLat, minLon, maxLon, n} : null;
}

// The tracks within a few pixels of (x, y), best first: the nearest, inner symbols
// (EO discs) before the outlines drawn around them (radar squares, fused diamonds).
const HIT_PENALTY = {[CIRCLE]: 0, [TRIANGLE]: 0, [SQUARE]: 3, [DIAMOND]: 6}; // px
function hits(x, y) {
  const {k, kx} = scales();
  const ox = W / 2 - view.lon * kx, oy = H / 2 + view.lat * k;
  const reach = R + 6, found = [];
  for (const [id, e] of tracks) {
    const p = e.position;
    if (!hasPos(p)) continue;
    const dx = ox + p.lon * kx - x, dy = oy - p.lat * k - y;
    if (Math.abs(dx) > reach || Math.abs(dy) > reach) continue;
    const d = Math.hypot(dx, dy);
    if (d <= reach) found.push([d + HIT_PENALTY[shapeOf(e)], id]);
  }
  return found.sort((a, b) => a[0] - b[0]).map((f) => f[1]);
}

const hitTest = (x, y) => hits(x, y)[0] ?? null;

// A click selects the best hit; clicking again on the same spot goes through the others
// (an EO track, its radar plot and their fused track sit on top of each other).
let lastClick = null;
function clickAt(x, y) {
  const found = hits(x, y);
  if (!found.length) return;
  let id = found[0];
  if (lastClick && Math.hypot(lastClick[0] - x, lastClick[1] - y) < 4 && found.includes(selected)) {
    id = found[(found.indexOf(selected) + 1) % found.length];
  }
  lastClick = [x, y];
  select(id);
}

// ---- map interaction -----------------------------------------------------------------

let drag = null;
const tip = $('#tip');

function local(ev) {
  const r = canvas.getBoundingClientRect();
  return [ev.clientX - r.left, ev.clientY - r.top];
}

canvas.addEventListener('pointerdown', (ev) => {
  if (ev.button !== 0) return;
  canvas.setPointerCapture(ev.pointerId);
  drag = {x: ev.clientX, y: ev.clientY, lat: view.lat, lon: view.lon, moved: false};
});

canvas.addEventListener('pointermove', (ev) => {
  const [x, y] = local(ev);
  if (drag) {
    const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (!drag.moved && dx * dx + dy * dy < 16) return;
    drag.moved = true;
    canvas.classList.add('dragging');
    tip.hidden = true;
    view.lat = clampLat(drag.lat + dy / view.scale);
    view.lon = drag.lon - dx / scales().kx;
    userMoved = true;
    invalidate();
    return;
  }
  const g = unproject(x, y);
  $('#cursor-pos').textContent = `${g.lat.toFixed(4)}, ${g.lon.toFixed(4)}`;
  const id = hitTest(x, y);
  canvas.classList.toggle('over-track', id != null);
  if (id != null) {
    const e = tracks.get(id);
    tip.textContent = `${id} \u00b7 ${threatOf(e) || 'no threat'}${e.source ? ` \u00b7 ${e.source.sensor_type}` : ''}`;
    tip.style.left = `${x + 14}px`;
    tip.style.top = `${y + 10}px`;
    tip.hidden = false;
  } else {
    tip.hidden = true;
  }
});

function endDrag(ev) {
  if (!drag) return;
  const click = !drag.moved;
  drag = null;
  canvas.classList.remove('dragging');
  if (click && ev.type === 'pointerup') clickAt(...local(ev));
}
canvas.addEventListener('pointerup', endDrag);
canvas.addEventListener('pointercancel', endDrag);
canvas.addEventListener('pointerleave', () => { tip.hidden = true; });

canvas.addEventListener('wheel', (ev) => {
  ev.preventDefault();
  const [x, y] = local(ev);
  const dy = ev.deltaMode === 1 ? ev.deltaY * 33 : ev.deltaY;
  zoomAt(x, y, Math.exp(-dy * 0.0015));
}, {passive: false});

$('#zoom-in').addEventListener('click', () => zoomAt(W / 2, H / 2, 1.6));
$('#zoom-out').addEventListener('click', () => zoomAt(W / 2, H / 2, 1 / 1.6));
$('#fit').addEventListener('click', () => {
  userMoved = false; // follow the tracks again
  fitted = fit();
});

new ResizeObserver(() => invalidate()).observe(canvas);

// ---- pending approvals ---------------------------------------------------------------

const pendingList = $('#pending');
const pendingRows = new Map(); // id -> {li, dot, task, countdown, error, buttons}
let moreNote = null;

function pendingRow(id) {
  const row = {};
  row.dot = h('span', {class: 'dot'});
  row.name = h('span', {class: 'id', title: 'show this track', onclick: () => select(id)}, id);
  row.countdown = h('span', {class: 'countdown', title: 'time left before TIMED_OUT'});
  row.approve = h('button', {class: 'approve', type: 'button', onclick: () => decide(id, 'approve', row)}, 'Approve');
  row.deny = h('button', {class: 'deny', type: 'button', onclick: () => decide(id, 'deny', row)}, 'Deny');
  row.error = h('span', {class: 'error', role: 'alert'});
  row.li = h('li', {'data-id': id}, row.dot, row.name, row.countdown, row.approve, row.deny, row.error);
  return row;
}

async function decide(id, action, row) {
  row.approve.disabled = row.deny.disabled = true;
  row.error.textContent = '';
  try {
    const e = await getJSON(`api/entities/${encodeURIComponent(id)}/${action}`, {method: 'POST'});
    // The stream brings the change too; the answer only makes the list react at once.
    if (e && e.id === id && approvalState(e) !== 'PENDING' && pendingIds.delete(id)) listDirty = true;
    refreshPending();
  } catch (err) {
    row.error.textContent = `${action} failed: ${err.message}`;
    row.approve.disabled = row.deny.disabled = false;
  }
}

function refreshPending() {
  if (listDirty) {
    listDirty = false;
    const items = [];
    for (const id of pendingIds) {
      const e = tracks.get(id);
      if (e) items.push([toSeconds(e.approval.requested_at) ?? Infinity, id, e]);
    }
    items.sort((a, b) => a[0] - b[0] || (a[1] < b[1] ? -1 : 1));
    const shown = items.slice(0, MAX_PENDING_SHOWN);
    const keep = new Set(shown.map((it) => it[1]));
    for (const [id, row] of pendingRows) {
      if (!keep.has(id)) { row.li.remove(); pendingRows.delete(id); }
    }
    shown.forEach(([, id, e], i) => {
      let row = pendingRows.get(id);
      if (!row) pendingRows.set(id, (row = pendingRow(id)));
      row.e = e;
      row.dot.className = `dot t-${threatOf(e)}`;
      row.li.classList.toggle('selected', id === selected);
      if (pendingList.children[i] !== row.li) pendingList.insertBefore(row.li, pendingList.children[i] || null);
    });
    $('#pending-count').textContent = String(items.length);
    $('#pending-empty').hidden = items.length > 0;
    if (items.length > shown.length) {
      if (!moreNote) moreNote = h('p', {class: 'more'});
      moreNote.textContent = `+${items.length - shown.length} more`;
      pendingList.after(moreNote);
    } else if (moreNote) {
      moreNote.remove();
    }
  }
  const now = serverNow();
  for (const row of pendingRows.values()) {
    const d = deadlineOf(row.e);
    const left = d == null ? null : d - now;
    const text = fmtLeft(left);
    if (row.countdown.textContent !== text) row.countdown.textContent = text;
    row.countdown.classList.toggle('soon', left != null && left < 10);
  }
}

// The server's clock, from the time left it reports (the countdowns use it).
async function syncClock() {
  try {
    const body = await getJSON('api/pending');
    const p = (body.pending || []).find((x) => finite(toSeconds(x.deadline)) && finite(x.time_left_s));
    if (p) clockSkew = toSeconds(p.deadline) - p.time_left_s - Date.now() / 1000;
  } catch { /* the stream's status says enough */ }
}

// ---- the track panel -----------------------------------------------------------------

const panelEl = $('#panel');
const panel = {
  stale: false,
  busy: false,
  id: null,
  gone(id) {
    const banner = h('p', {class: 'deleted'}, `${id} was deleted`);
    const old = panelEl.querySelector('p.deleted');
    if (old) old.remove();
    panelEl.prepend(banner);
    this.stale = false;
  },
};

function select(id) {
  selected = id;
  panel.id = id;
  panel.stale = true;
  listDirty = true;
  refreshPanel();
  refreshPending();
  invalidate();
}

async function refreshPanel() {
  if (!selected || panel.busy) return;
  panel.busy = true;
  panel.stale = false;
  const id = selected;
  try {
    const e = await getJSON(`api/entities/${encodeURIComponent(id)}`);
    if (id === selected) renderPanel(e);
  } catch (err) {
    if (id !== selected) return;
    if (err.status === 404) {
      if (!panelEl.dataset.id || panelEl.dataset.id !== id) panelEl.replaceChildren(h('h3', {}, id));
      panelEl.dataset.id = id;
      panel.gone(id);
    } else {
      panelEl.replaceChildren(h('h3', {}, id), h('p', {class: 'deleted'}, `could not load: ${err.message}`));
    }
  } finally {
    panel.busy = false;
  }
}

function compact(v) {
  if (v == null) return '\u2014';
  if (typeof v !== 'object') return String(v);
  return JSON.stringify(v, (k, x) => (typeof x === 'number' && !Number.isInteger(x) ? Number(x.toPrecision(8)) : x));
}

// A decoded component: one "field: value" line per field (nested values as JSON).
function fieldsText(v) {
  if (v == null || typeof v !== 'object' || Array.isArray(v)) return compact(v);
  const lines = Object.entries(v).map(([k, x]) => `${k}: ${typeof x === 'string' ? x : compact(x)}`);
  return lines.length ? lines.join('\n') : '{}';
}

// A key's version ({node, physical_ns, logical, incarnation, counter, concurrent}) as
// "#counter hh:mm:ss.mmm+logical [n concurrent]"; its node is the origin column.
function versionText(v) {
  if (v == null) return '\u2014';
  if (typeof v !== 'object') return String(v);
  const parts = [];
  if (v.counter != null) parts.push(`#${v.counter}`);
  const ns = v.physical_ns ?? v.physical;
  const sec = Number(ns) / 1e9;
  if (Number.isFinite(sec) && sec > 0) parts.push(fmtTime(sec).slice(11, 23));
  if (v.logical) parts.push(`+${v.logical}`);
  const concurrent = Array.isArray(v.concurrent) ? v.concurrent.length : v.concurrent;
  if (concurrent) parts.push(`(${concurrent} concurrent)`);
  const text = parts.join(' ');
  return v.incarnation ? h('span', {title: `incarnation ${v.incarnation}`}, text) : text;
}

const originOf = (v) => (v && typeof v === 'object' ? v.node ?? '' : '') || '';

// A component ({type_url, value, bytes}) as its decoded value; the type's short name as a tooltip.
function componentCell(c) {
  if (c == null) return h('td', {class: 'value'}, '\u2014');
  if (typeof c !== 'object' || !('type_url' in c)) return h('td', {class: 'value'}, fieldsText(c));
  const type = String(c.type_url || '').split('/').pop();
  const text = c.value == null ? `(${type || 'unknown type'}, ${c.bytes ?? '?'} bytes, not decoded)` : fieldsText(c.value);
  return h('td', {class: 'value', title: `${type} \u00b7 ${c.bytes ?? '?'} bytes`}, text);
}

function renderPanel(e) {
  panelEl.dataset.id = e.id;
  const threat = threatOf(e);
  const facts = [
    ['type', enumName(e.type)],
    ['threat', threat || '\u2014'],
    ['sensor', e.source ? `${e.source.sensor_type} (${e.source.sensor_id})` : null],
    ['position', hasPos(e.position) ? `${e.position.lat.toFixed(5)}, ${e.position.lon.toFixed(5)}${finite(e.position.alt) && e.position.alt ? `, ${fmtNum(e.position.alt)} m` : ''}` : null],
    ['velocity', e.velocity ? `${fmtNum(e.velocity.speed)} kt, ${fmtNum(e.velocity.heading)}\u00b0` : null],
    ['class', e.classification ? `${e.classification.label} (confidence ${fmtNum(e.classification.confidence)})` : null],
    ['task', e.task ? (e.task.task ?? e.task.state ?? compact(e.task)) : null],
    ['approval', e.approval ? `${approvalState(e)}${approvalState(e) === 'PENDING' && deadlineOf(e) != null ? ` (${fmtLeft(deadlineOf(e) - serverNow())} left)` : ''}${e.approval.decided_by ? ` by ${e.approval.decided_by}` : ''}` : null],
    ['fused from', e.fusion && e.fusion.source_ids ? e.fusion.source_ids.join(', ') : null],
    ['origin', e.origin_node ?? null],
    ['updated', e.updated_at != null ? fmtTime(toSeconds(e.updated_at)) : null],
    ['expires', e.expires_at != null ? fmtTime(toSeconds(e.expires_at)) : null],
  ].filter(([, v]) => v != null && v !== '');
  const dl = h('dl', {}, facts.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));

  const components = e.components || {};
  const versions = e.versions || {};
  const keys = [...new Set([...Object.keys(components), ...Object.keys(versions)])].sort();
  const rows = keys.map((key) => h('tr', {'data-key': key},
    h('td', {class: 'key'}, key),
    key in components ? componentCell(components[key]) : h('td', {class: 'hint'}, '(the entity\u2019s own version)'),
    h('td', {class: 'version'}, versionText(versions[key])),
    h('td', {class: 'origin'}, originOf(versions[key]))));
  const table = h('table', {class: 'components'},
    h('thead', {}, h('tr', {}, h('th', {}, 'key'), h('th', {}, 'value'), h('th', {}, 'version'), h('th', {}, 'origin'))),
    h('tbody', {}, rows));

  const siblings = Array.isArray(e.siblings) ? e.siblings : [];
  const sibs = siblings.length
    ? [h('h4', {}, `siblings: ${siblings.length} concurrent write${siblings.length > 1 ? 's' : ''} pending`),
      h('table', {class: 'siblings'}, h('tbody', {}, siblings.map((s) => h('tr', {class: 'sibling'},
        h('td', {class: 'key'}, s.key ?? ''),
        h('td', {class: 'value'}, fieldsText(s.value)),
        h('td', {class: 'version'}, versionText(s.version ?? s)),
        h('td', {class: 'origin'}, originOf(s.version ?? s))))))]
    : [h('p', {class: 'hint'}, 'no siblings (no concurrent writes pending)')];

  panelEl.replaceChildren(
    h('h3', {}, h('span', {class: `dot t-${threat}`}), e.id),
    dl,
    h('h4', {}, `components (${keys.length})`),
    table,
    ...sibs);
}

// ---- mesh health ---------------------------------------------------------------------

const meshEl = $('#mesh');

async function refreshMesh() {
  let m;
  try {
    m = await getJSON('api/mesh');
  } catch (err) {
    meshEl.replaceChildren(h('p', {class: 'err'}, `unreachable: ${err.message}`));
    return;
  }
  $('#node-id').textContent = `${m.node_id ?? '?'} @ ${m.address ?? '?'}`;
  const peers = Array.isArray(m.peers) ? m.peers : [];
  const summary = h('div', {class: 'summary'},
    h('b', {}, m.node_id ?? '?'), ` at ${m.address ?? '?'} \u00b7 seq ${m.seq ?? '\u2014'} \u00b7 `,
    peers.length ? `${peers.filter((p) => p.connected).length}/${peers.length} peers up` : 'no peers');
  const parts = [summary];
  if (peers.length) {
    parts.push(h('table', {class: 'peers'},
      h('thead', {}, h('tr', {}, ['peer', 'link', 'lag', 'pending', 'deferred', 'coalesced', 'sent'].map((c) => h('th', {}, c)))),
      h('tbody', {}, peers.map((p) => [
        h('tr', {'data-peer': p.address},
          h('td', {}, p.address, p.node_id ? h('div', {class: 'hint'}, p.node_id) : null),
          h('td', {class: p.connected ? 'up' : 'down'}, p.connected ? 'up' : 'down'),
          h('td', {class: 'num'}, fmtNum(p.lag)),
          h('td', {class: 'num'}, fmtNum(p.pending)),
          h('td', {class: 'num'}, fmtNum(p.deferred)),
          h('td', {class: 'num'}, fmtNum(p.coalesced)),
          h('td', {class: 'num'}, fmtNum(p.sent_states))),
        p.last_error ? h('tr', {}, h('td', {class: 'err', colspan: 7}, `last error: ${p.last_error}`)) : null,
      ]))));
  }
  const st = m.storage;
  if (st && typeof st === 'object') {
    parts.push(h('div', {class: 'hint'}, 'storage: ',
      Object.entries(st).filter(([, v]) => v == null || typeof v !== 'object').slice(0, 8)
        .map(([k, v]) => `${k}=${typeof v === 'number' ? fmtNum(v) : v}`).join(' \u00b7 ')));
  }
  meshEl.replaceChildren(...parts);
}

// ---- start ---------------------------------------------------------------------------

setStatus('connecting');
connect();
refreshMesh();
syncClock();
setInterval(refreshMesh, 2000);
setInterval(syncClock, 5000);
setInterval(refreshPending, 250);
setInterval(() => { if (panel.stale && !panel.busy) refreshPanel(); }, 1000);
invalidate();
