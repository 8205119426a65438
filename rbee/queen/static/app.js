// rbee fleet dashboard: the queen's SSE stream (/v1/heartbeats/stream) folded into a fleet model,
// drawn at most once per animation frame. Read-only; no inline script or style (the page's CSP).
//
// Why it stays smooth with 10,000 workers updating every second: events only change the model (a
// hive's event replaces that hive's workers and its totals, nothing else) and ask for a frame;
// a frame adds up hives, not workers; it re-sorts and re-filters the workers only when the set of
// workers, the filters or the sort changed, or (sorting by a changing figure, or idle only) at
// most every 0.5 s (2 s past 2,000 workers); only the rows in view are in the DOM, their cells diffed against what is
// shown; only the GPU cards of hives that changed are touched. The queen's own summary (its
// `queen` event) gives the fleet's request counts. window.rbeeDashboard exposes the time each
// render took (script plus the style and layout it forces), for the browser test.
"use strict";

(() => {
  // With the queen's read_token_file set, open the page as /?access_token=<read token>: the
  // stream takes it as a query parameter (EventSource sends no header), the history as a header.
  const ACCESS_TOKEN = new URLSearchParams(location.search).get("access_token");
  const STREAM = "/v1/heartbeats/stream" +
    (ACCESS_TOKEN ? `?access_token=${encodeURIComponent(ACCESS_TOKEN)}` : "");
  const BACKOFF_MIN_MS = 250, BACKOFF_MAX_MS = 5000;
  const SPARK = "▁▂▃▄▅▆▇█";
  const $ = (id) => document.getElementById(id);

  const fleet = new Map(); // hive id -> {id, stale, health, status, workers, gpus, keys, totals}
  const trends = new Map(); // worker key -> [values] (last 60 s)
  const rows = new Map(); // worker key -> {tr, cells, shown}: the rows in the DOM
  const entries = new Map(); // worker key -> {key, hive, worker}: every worker, kept by the events
  const dirtyHives = new Set(); // hives whose GPUs (cards) changed since the last frame
  const stats = { renders: 0, times: [], applyTimes: [], events: 0, connection: "connecting", connects: 0 };
  // How often the order is made again while the figures it sorts by move: a table of thousands
  // of rows reshuffled twice a second cannot be read anyway, and at 10,000 workers each time
  // costs a few ms of script and a layout of the rows that moved.
  const resortMs = () => (entries.size > 2000 ? 2000 : 500);
  let order = []; // keys of the workers that pass the filters, in the shown order
  let membershipChanged = true, valuesChanged = true, lastSortAt = 0, gpusChanged = true;
  let queenSummary = null;
  let fleetWorkers = 0; // the queen's count of online workers (its `queen` event)
  let sort = { key: "name", dir: 1 };
  let framePending = false;
  let panelKey = null;

  // -- the stream --------------------------------------------------------------------------

  let source = null, backoff = BACKOFF_MIN_MS, retryTimer = null;

  function connect() {
    retryTimer = null;
    source = new EventSource(STREAM);
    source.addEventListener("open", () => {
      backoff = BACKOFF_MIN_MS;
      stats.connects += 1;
    });
    source.addEventListener("heartbeat", (message) => {
      const started = performance.now();
      let event;
      try { event = JSON.parse(message.data); } catch { return; }
      apply(event);
      stats.applyTimes.push(performance.now() - started); // what an event costs before its frame
      if (stats.applyTimes.length > 20000) stats.applyTimes.splice(0, 10000);
    });
    source.addEventListener("error", () => {
      // EventSource would retry on its own at a fixed pace; ours backs off with jitter and says so
      source.close();
      setConnection("reconnecting");
      const delay = backoff * (0.5 + Math.random() / 2);
      backoff = Math.min(BACKOFF_MAX_MS, backoff * 2);
      retryTimer = setTimeout(connect, delay);
    });
  }

  function apply(event) {
    stats.events += 1;
    switch (event.type) {
      case "snapshot":
        for (const id of [...fleet.keys()]) dropHive(id);
        for (const state of event.hives || []) {
          setHive(state.hive.id, state.workers, state.capabilities, state.hive.health_status,
                  state.stale, state.hive.operational_status, state.idle, state.hive.plugins);
        }
        setConnection("live");
        break;
      case "hive_telemetry": {
        const known = fleet.get(event.hive_id);
        setHive(event.hive_id, event.workers, event.capabilities,
                event.health_status || (known && known.health), false, known && known.status,
                event.idle, known && known.plugins);
        if (known && known.asked) fleet.get(event.hive_id).asked = true;
        break;
      }
      case "hive_stale": {
        const hive = fleet.get(event.hive_id);
        if (hive) { // the queen: stale is never idle
          hive.stale = true; hive.idle = new Set(); hive.totals.idle = 0;
          dirtyHives.add(hive.id); valuesChanged = true;
        }
        break;
      }
      case "hive_removed":
        dropHive(event.hive_id);
        break;
      case "queen":
        queenSummary = event.summary || null;
        fleetWorkers = event.workers_online || 0;
        break;
      default:
        return; // lagged (a snapshot follows)
    }
    requestRender();
  }

  function dropHive(id) {
    const hive = fleet.get(id);
    if (!hive) return;
    for (const key of hive.keys) entries.delete(key);
    fleet.delete(id);
    membershipChanged = gpusChanged = true;
  }

  // plugins: the hive's declared plugin figures (HiveInfo.plugins, in snapshots), by metrics key.
  // A hive's event replaces its workers' entries and its totals (idle workers, GPUs, free VRAM,
  // the VRAM its workers claim per GPU, its models): the frame then adds up hives, not workers.
  function setHive(id, workers, gpus, health, stale, status, idle, plugins) {
    const before = fleet.get(id);
    const hive = { id, workers: workers || [], gpus: gpus || [], health: health || null,
                   stale: Boolean(stale), status: status || null, idle: new Set(idle || []),
                   plugins: plugins instanceof Map ? plugins : declared(plugins), keys: [] };
    const claimed = new Map(), models = new Set();
    let idleCount = 0;
    for (const worker of hive.workers) {
      const key = `${id}/${worker.group}/${worker.instance}`;
      hive.keys.push(key);
      entries.set(key, { key, hive, worker });
      if (worker.model) models.add(worker.model);
      if (!hive.stale && hive.idle.has(`${worker.group}/${worker.instance}`)) idleCount += 1;
      for (const use of worker.gpus || []) claimed.set(use.uuid, (claimed.get(use.uuid) || 0) + (use.vram_mb || 0));
    }
    let freeMb = 0;
    for (const gpu of hive.gpus) freeMb += gpu.vram_free_mb || 0;
    hive.totals = { idle: idleCount, freeMb, claimed, models };
    const sameWorkers = before && before.keys.length === hive.keys.length && before.keys.every((k, i) => k === hive.keys[i]);
    if (before && !sameWorkers) for (const key of before.keys) if (!entries.get(key) || entries.get(key).hive !== hive) entries.delete(key);
    if (!sameWorkers) membershipChanged = true;
    const gpuKeys = (h) => h.gpus.map((g) => g.uuid).join(",");
    if (!before || before.stale !== hive.stale || gpuKeys(before) !== gpuKeys(hive)) gpusChanged = true;
    valuesChanged = true;
    dirtyHives.add(id);
    fleet.set(id, hive);
  }

  function declared(plugins) {
    const specs = new Map();
    for (const plugin of plugins || []) {
      for (const spec of plugin.metrics || []) specs.set(`${plugin.name}.${spec.name}`, spec);
    }
    return specs;
  }

  function setConnection(state) {
    if (stats.connection === state) return;
    stats.connection = state;
    $("connection").dataset.state = state;
    $("connection-text").textContent = state === "live" ? "live" :
      state === "reconnecting" ? "reconnecting…" : state;
  }

  // -- rendering ---------------------------------------------------------------------------

  function requestRender() {
    if (framePending) return;
    framePending = true;
    requestAnimationFrame(render);
  }

  function render() {
    framePending = false;
    const started = performance.now();
    renderSummary();
    renderHives();
    renderGpus();
    const t1 = performance.now();
    renderWorkers();
    const t2 = performance.now();
    void document.body.offsetHeight; // the style and layout this frame needs, inside the figure
    const took = performance.now() - started;
    stats.phases = [t1 - started, t2 - t1, performance.now() - t2]; // summary and GPUs, rows, style+layout
    stats.renders += 1;
    stats.times.push(took);
    if (stats.times.length > 2000) stats.times.splice(0, 1000);
    if (panelKey !== null) renderPanelFacts();
  }

  // Idle is the queen's judgement (its `idle` lists), never recomputed here: the same figure
  // as the stream's workers_available, /v1/workers?idle=true, `rbee workers` and `rbee top`.
  function isIdle(entry) {
    return !entry.hive.stale && entry.hive.idle.has(`${entry.worker.group}/${entry.worker.instance}`);
  }

  function setText(element, text) {
    if (element.textContent !== text) element.textContent = text;
  }

  function renderSummary() {
    let gpus = 0, freeMb = 0, fresh = 0, idle = 0;
    for (const hive of fleet.values()) {
      if (hive.stale) continue;
      fresh += 1;
      gpus += hive.gpus.length;
      freeMb += hive.totals.freeMb;
      idle += hive.totals.idle;
    }
    const stale = fleet.size - fresh;
    setText($("s-hives"), `${fleet.size}${stale ? ` (${stale} stale)` : ""}`);
    setText($("s-workers"), String(entries.size));
    setText($("s-gpus"), String(gpus));
    setText($("s-vram"), gpus ? mib(freeMb) : "–");
    setText($("s-idle"), String(idle));
    const q = queenSummary; // the queen's totals, every stream.queen_interval_s
    setText($("s-requests"), q ? `${q.requests_running || 0} run / ${q.requests_waiting || 0} wait` : "–");
    setText($("s-busy"), q ? String(q.workers_busy || 0) : "–");
  }

  let hivesShown = "";
  function renderHives() {
    const items = [...fleet.values()].sort((a, b) => a.id.localeCompare(b.id));
    const signature = items.map((h) => `${h.id}|${h.stale}|${health(h.health)}|${h.workers.length}`).join(",");
    if (signature === hivesShown) return;
    hivesShown = signature;
    const list = $("hives");
    list.replaceChildren(...items.map((hive) => {
      const li = document.createElement("li");
      li.append(`${hive.id}: ${hive.workers.length} workers, ${health(hive.health)} `);
      if (hive.stale) li.append(badge("STALE", "stale"));
      return li;
    }));
    const hiveSelect = $("f-hive");
    syncOptions(hiveSelect, items.map((h) => h.id));
  }

  // One card per GPU, built once and then updated in place (text diffs), so a hive going stale
  // and back, or new figures every second, never rebuilds the grid.
  const cards = new Map(); // "hive/uuid" -> {article, title, badge, meter, bar, values}
  const FACTS = ["Utilisation", "VRAM used", "VRAM free", "Claimed by rbee", "Temperature", "Power", "Health"];
  let cardsShown = "";

  function renderGpus() {
    for (const id of dirtyHives) {
      const hive = fleet.get(id);
      if (!hive) continue;
      for (const gpu of hive.gpus) {
        const key = `${hive.id}/${gpu.uuid}`;
        updateCard(cards.get(key) || newCard(key), hive, gpu, hive.totals.claimed.get(gpu.uuid) || 0);
      }
    }
    dirtyHives.clear();
    if (!gpusChanged) return;
    gpusChanged = false;
    const keys = [];
    for (const hive of [...fleet.values()].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0))) {
      for (const gpu of hive.gpus) keys.push(`${hive.id}/${gpu.uuid}`);
    }
    const signature = keys.join("\n");
    if (signature === cardsShown) return;
    cardsShown = signature;
    const wanted = new Set(keys);
    for (const key of cards.keys()) if (!wanted.has(key)) cards.delete(key);
    $("no-gpus").hidden = keys.length > 0;
    $("gpus").replaceChildren(...keys.map((key) => cards.get(key).article));
  }

  function newCard(key) {
    const article = document.createElement("article");
    article.className = "card";
    const heading = document.createElement("h3");
    const title = document.createTextNode("");
    const staleBadge = badge("STALE", "stale");
    heading.append(title, " ", staleBadge);
    const meter = document.createElement("div");
    meter.className = "meter";
    meter.setAttribute("role", "meter");
    meter.setAttribute("aria-label", "VRAM used, percent");
    meter.setAttribute("aria-valuemin", "0");
    meter.setAttribute("aria-valuemax", "100");
    const bar = document.createElement("span");
    meter.append(bar);
    const facts = document.createElement("dl");
    const values = FACTS.map((name) => {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      facts.append(dt, dd);
      return dd;
    });
    article.append(heading, meter, facts);
    const card = { article, title, staleBadge, meter, bar, values, used: null, stale: null };
    cards.set(key, card);
    return card;
  }

  function updateCard(card, hive, gpu, claimedMb) {
    if (card.title.data !== `${hive.id} · GPU ${gpu.index} · ${gpu.name}`) {
      card.title.data = `${hive.id} · GPU ${gpu.index} · ${gpu.name}`;
    }
    if (card.stale !== hive.stale) {
      card.stale = hive.stale;
      card.staleBadge.hidden = !hive.stale;
      card.article.classList.toggle("is-stale", hive.stale);
    }
    const used = gpu.vram_total_mb ? Math.round(gpu.vram_used_mb / gpu.vram_total_mb * 100) : 0;
    if (card.used !== used) {
      card.used = used;
      card.meter.setAttribute("aria-valuenow", String(used));
      card.bar.style.width = `${used}%`; // CSSOM, which the CSP allows
    }
    const state = health(gpu.health);
    const texts = [
      pct(gpu.util_pct), `${mib(gpu.vram_used_mb)} of ${mib(gpu.vram_total_mb)}`, mib(gpu.vram_free_mb),
      mib(claimedMb), gpu.temperature_c == null ? "–" : `${Math.round(gpu.temperature_c)} °C`,
      gpu.power_w == null ? "–" : `${Math.round(gpu.power_w)} W`, state,
    ];
    texts.forEach((text, i) => setText(card.values[i], text));
    const healthCell = card.values[FACTS.length - 1];
    const healthClass = state.split(":")[0];
    if (healthCell.className !== healthClass) { healthCell.className = healthClass; }
    if (healthCell.title !== state) healthCell.title = state;
  }

  const COLUMNS = ["name", "model", "cpu", "rss", "io", "gpu", "vram", "queue", "kv", "uptime", "spark", "errors", "state"];
  const STATE_AT = COLUMNS.indexOf("state");

  // The worker's state as the hive reports it (rbee.telemetry.WorkerState): only "running" takes
  // work; a failed worker stays listed, in backoff or crashloop with its restarts, or ended.
  function stateOf(w) {
    const state = w.state || "running";
    return w.restarts ? `${state} · ${w.restarts}↻` : state;
  }

  // A worker on no GPU has no GPU figures: shown as absent, never 0 (as the CLI and /metrics).
  function onGpu(w) {
    return Boolean((w.gpus && w.gpus.length) || (w.gpu_indices && w.gpu_indices.length));
  }

  function cellsOf(entry) {
    const w = entry.worker, engine = w.engine || null;
    const waiting = engine ? (engine.requests_waiting ?? null) : null;
    const running = engine ? (engine.requests_running ?? null) : null;
    return {
      name: entry.key + (entry.hive.stale ? " · STALE" : ""),
      model: w.model || "–",
      cpu: num(w.cpu_pct, 1),
      rss: num(w.rss_mb, 0),
      io: `${num(w.io_r_mb_s, 2)}/${num(w.io_w_mb_s, 2)}`,
      gpu: w.gpu_util_pct == null ? "–" : num(w.gpu_util_pct, 0),
      vram: onGpu(w) ? num(w.vram_mb, 0) : "–",
      queue: engine && (running !== null || waiting !== null) ? `${running ?? "–"} run / ${waiting ?? "–"} wait` : "–",
      kv: engine && engine.kv_cache_pct != null ? num(engine.kv_cache_pct, 0) : "–",
      uptime: duration(w.uptime_s),
      spark: spark(trends.get(entry.key)),
      errors: (w.errors || []).length ? String(w.errors.length) : "",
      state: stateOf(w),
    };
  }

  function sortValue(entry) {
    const w = entry.worker, e = w.engine || {};
    switch (sort.key) {
      case "name": return entry.key;
      case "model": return w.model || "";
      case "cpu": return w.cpu_pct;
      case "rss": return w.rss_mb;
      case "io": return (w.io_r_mb_s || 0) + (w.io_w_mb_s || 0);
      case "gpu": return w.gpu_util_pct ?? -1;
      case "vram": return onGpu(w) ? w.vram_mb : -1;
      case "queue": return e.requests_waiting ?? -1;
      case "kv": return e.kv_cache_pct ?? -1;
      case "uptime": return w.uptime_s;
      case "errors": return (w.errors || []).length;
      case "state": return stateOf(w);
      default: return entry.key;
    }
  }

  // Only the rows in view (and a margin) are in the DOM: the table scrolls in its own box and
  // two spacer rows stand for the rest, so style and layout cost the same for 10 or 10,000
  // workers. `order` is every worker that passes the filters, in the shown order.
  const ROW_PX = 28, MARGIN_ROWS = 15;
  let windowShown = "";

  // The shown order, made again only when it can have changed: the workers, the filters or the
  // sort changed, or (by a figure that moves, or idle only) resortMs passed with new figures.
  let orderedBy = "", byName = [];
  function reorder(now) {
    const hiveFilter = $("f-hive").value, modelFilter = $("f-model").value, idleOnly = $("f-idle").checked;
    const by = `${hiveFilter}|${modelFilter}|${idleOnly}|${sort.key}|${sort.dir}`;
    const moving = idleOnly || (sort.key !== "name" && sort.key !== "model");
    if (!membershipChanged && by === orderedBy && !(moving && valuesChanged && now - lastSortAt >= resortMs())) return;
    if (membershipChanged) {
      const models = new Set();
      for (const hive of fleet.values()) for (const model of hive.totals.models) models.add(model);
      syncOptions($("f-model"), [...models].sort());
    }
    if (membershipChanged) byName = [...entries.keys()].sort();
    membershipChanged = false;
    valuesChanged = false;
    orderedBy = by;
    lastSortAt = now;
    // Workers that pass, in name order; then sorted by the column's figure, ties in name order
    // (the index): numbers compared as numbers, no string in the comparator (10,000 in ~3 ms).
    const keys = [], values = [];
    for (const key of byName) {
      const entry = entries.get(key);
      if ((!hiveFilter || entry.hive.id === hiveFilter) && (!modelFilter || entry.worker.model === modelFilter)
          && (!idleOnly || isIdle(entry))) {
        keys.push(key);
        values.push(sortValue(entry));
      }
    }
    const dir = sort.dir;
    if (sort.key === "name") {
      order = dir > 0 ? keys : keys.reverse();
      return;
    }
    const index = Array.from(keys, (_, i) => i);
    if (typeof values[0] === "number") {
      index.sort((a, b) => (values[a] - values[b]) * dir || a - b);
    } else {
      index.sort((a, b) => (values[a] < values[b] ? -dir : values[a] > values[b] ? dir : a - b));
    }
    order = index.map((i) => keys[i]);
  }

  function renderWorkers() {
    reorder(performance.now());
    const scroller = $("table-scroll");
    const first = Math.max(0, Math.floor(scroller.scrollTop / ROW_PX) - MARGIN_ROWS);
    const count = Math.ceil((scroller.clientHeight || 800) / ROW_PX) + 2 * MARGIN_ROWS;
    const shown = [];
    for (const key of order.slice(first, first + count)) {
      const entry = entries.get(key);
      if (entry) shown.push(entry);
    }
    const visibleCount = order.length, total = entries.size;
    const keep = new Set();
    for (const entry of shown) {
      keep.add(entry.key);
      const row = rows.get(entry.key) || newRow(entry.key);
      const cells = cellsOf(entry);
      for (let i = 0; i < COLUMNS.length; i++) {
        const text = cells[COLUMNS[i]];
        if (row.shown[i] !== text) { row.shown[i] = text; row.cells[i].data = text; }
      }
      const stale = entry.hive.stale;
      if (row.stale !== stale) { row.stale = stale; row.tr.classList.toggle("is-stale", stale); }
      const state = `state s-${entry.worker.state || "running"}`;
      const stateCell = row.cells[STATE_AT].parentNode;
      if (stateCell.className !== state) stateCell.className = state;
    }
    for (const key of rows.keys()) if (!keep.has(key)) rows.delete(key);
    const signature = `${first}|${visibleCount}|${shown.map((e) => e.key).join("\n")}`;
    if (signature !== windowShown) {
      windowShown = signature;
      const height = `min(72vh, ${(visibleCount + 1) * ROW_PX + 4}px)`;
      if (scroller.style.height !== height) scroller.style.height = height;
      topSpacer.style.height = `${first * ROW_PX}px`;
      bottomSpacer.style.height = `${Math.max(0, visibleCount - first - shown.length) * ROW_PX}px`;
      const focused = document.activeElement; // moving a row out and back would drop its focus
      $("worker-rows").replaceChildren(topSpacer, ...shown.map((e) => rows.get(e.key).tr), bottomSpacer);
      if (focused && focused !== document.activeElement && focused.isConnected) {
        focused.focus({ preventScroll: true });
      }
    }
    setText($("workers-count"), visibleCount === total ? `(${total})` : `(${visibleCount} of ${total})`);
  }

  function spacer() {
    const div = document.createElement("div");
    div.className = "spacer";
    div.setAttribute("aria-hidden", "true");
    return div;
  }
  const topSpacer = spacer(), bottomSpacer = spacer();

  function newRow(key) {
    const tr = document.createElement("div");
    tr.className = "row";
    tr.setAttribute("role", "row");
    tr.tabIndex = 0;
    tr.dataset.key = key;
    const cells = COLUMNS.map((column) => {
      const cell = document.createElement("div");
      cell.setAttribute("role", column === "name" ? "rowheader" : "cell");
      if (column === "spark") cell.className = "spark";
      if (column === "errors") cell.className = "err";
      const text = document.createTextNode("");
      cell.append(text);
      tr.append(cell);
      return text;
    });
    const row = { tr, cells, shown: new Array(COLUMNS.length).fill(""), stale: false };
    rows.set(key, row);
    return row;
  }

  function syncOptions(select, values) {
    const have = [...select.options].slice(1).map((o) => o.value);
    if (have.length === values.length && have.every((v, i) => v === values[i])) return;
    const chosen = select.value;
    select.replaceChildren(select.options[0], ...values.map((v) => new Option(v, v)));
    select.value = values.includes(chosen) ? chosen : "";
  }

  // -- formatting --------------------------------------------------------------------------

  function num(value, digits) { return value == null ? "–" : Number(value).toFixed(digits); }
  function pct(value) { return value == null ? "–" : `${Math.round(value)} %`; }
  function mib(value) {
    if (value == null) return "–";
    return value >= 10240 ? `${(value / 1024).toFixed(1)} GiB` : `${Math.round(value)} MiB`;
  }
  function duration(seconds) {
    if (seconds == null) return "–";
    const h = Math.floor(seconds / 3600), m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
    return h ? `${h}:${String(m).padStart(2, "0")}:${String(s).padStart(2, "0")}` : `${m}:${String(s).padStart(2, "0")}`;
  }
  function health(status) {
    if (!status) return "unknown";
    return status.status === "healthy" ? "healthy" : `${status.status}: ${status.reason}`;
  }
  function badge(text, cls) {
    const span = document.createElement("span");
    span.className = `badge ${cls}`;
    span.textContent = text;
    return span;
  }
  function spark(values) {
    if (!values) return "";
    const known = values.filter((v) => v != null);
    if (!known.length) return "";
    const top = Math.max(1, ...known);
    return values.map((v) => v == null ? " " : SPARK[Math.min(7, Math.floor(v / top * 7.999))]).join("");
  }

  // -- history: sparklines every 5 s, and the worker panel ---------------------------------

  async function history(params) {
    const response = await fetch(`/v1/history?${new URLSearchParams(params)}`,
      ACCESS_TOKEN ? { headers: { Authorization: `Bearer ${ACCESS_TOKEN}` } } : {});
    if (!response.ok) throw new Error(`history: HTTP ${response.status}`);
    return response.json();
  }

  // A small fleet's sparklines come in one query; past FLEET_TRENDS workers (a query may match
  // at most history.max_series_per_query series) only the hives of the rows in view are asked.
  // The fleet's size is the larger of what this page holds and what the queen counts: while the
  // first events arrive the page holds fewer workers than the queen's history does. A whole-fleet
  // query the queen refuses as too wide (400) makes every later one ask hive by hive.
  const FLEET_TRENDS = 2000;
  let trendsByHive = false;
  async function refreshTrends() {
    const wide = trendsByHive || Math.max(entries.size, fleetWorkers) > FLEET_TRENDS;
    const selectors = !wide ? [{}]
      : [...new Set([...rows.keys()].map((key) => key.split("/")[0]))].map((hive) => ({ hive }));
    try {
      const answers = await Promise.all(selectors.map((selector) =>
        history({ ...selector, metric: "cpu_pct,gpu_util_pct", since: "60", step: "5" })
          .catch((problem) => {
            if (!selector.hive && String(problem).includes("HTTP 400")) trendsByHive = true;
            throw problem;
          })));
      const byKey = new Map();
      for (const answer of answers) {
        for (const series of answer.series) {
          const key = `${series.hive}/${series.group}/${series.instance}`;
          const slot = byKey.get(key) || {};
          slot[series.metric] = series.values;
          byKey.set(key, slot);
        }
      }
      if (selectors.length === 1 && !selectors[0].hive) trends.clear();
      for (const [key, slot] of byKey) {
        const gpu = slot.gpu_util_pct;
        trends.set(key, gpu && gpu.some((v) => v != null) ? gpu : slot.cpu_pct);
      }
      requestRender();
    } catch {
      // best effort: the queen is down or too old for history; the column stays as it was
    }
  }

  const charts = [];

  function openPanel(key) {
    panelKey = key;
    const panel = $("panel");
    panel.hidden = false;
    setText($("panel-title"), key);
    renderPanelFacts();
    panel.focus();
    refreshPanel();
  }

  function closePanel() {
    const key = panelKey;
    panelKey = null;
    $("panel").hidden = true;
    for (const chart of charts.splice(0)) chart.destroy();
    const row = key && rows.get(key);
    if (row) row.tr.focus();
  }

  function renderPanelFacts() {
    const entry = entries.get(panelKey);
    if (!entry) { setText($("panel-facts"), "This worker is gone."); return; }
    const w = entry.worker;
    const limits = [w.cpu_limit_pct != null ? `CPU limit ${w.cpu_limit_pct} %` : null,
                    w.memory_limit_mb != null ? `memory limit ${mib(w.memory_limit_mb)}` : null].filter(Boolean);
    const exit = w.last_exit;
    const ended = exit ? [`last exit ${exit.oom_killed ? "OOM-killed" : exit.signal || (exit.exit_code != null
      ? `status ${exit.exit_code}` : "unknown status")} after ${duration(Math.round(exit.ran_s || 0))}`] : [];
    setText($("panel-facts"), [`pid ${w.pid}`, `state ${w.state || "running"}`, `model ${w.model || "–"}`,
      ...(w.endpoint ? [`endpoint ${w.endpoint}`] : []),
      `up ${duration(w.uptime_s)}`, ...limits,
      ...(w.restarts ? [`${w.restarts} restarts`] : []), ...(w.oom_kills ? [`${w.oom_kills} OOM kills`] : []),
      ...(w.next_attempt_at ? [`next start ${new Date(w.next_attempt_at).toLocaleTimeString()}`] : []),
      ...ended, ...(w.errors || []).map((e) => `${e.collector}: ${e.message}`)].join(" · "));
    setText($("panel-stderr"), exit && exit.stderr_tail && exit.stderr_tail.length
      ? exit.stderr_tail.join("\n") : "");
    renderPanelPlugins(w, entry.hive);
  }

  // The worker's plugin figures (WorkerTelemetry.metrics), with the unit and help text its
  // plugin declares (the help as the key's tooltip); an undeclared figure is shown as it is.
  // Declarations come with snapshots; a hive first heard of in a hive_telemetry event has its
  // fetched once, from /v1/hives/{id}, when a panel first shows one of its plugin figures.
  function renderPanelPlugins(w, hive) {
    const specs = hive.plugins;
    if (specs.size === 0 && Object.keys(w.metrics || {}).length && !hive.asked) {
      hive.asked = true;
      fetch(`/v1/hives/${encodeURIComponent(hive.id)}`,
        ACCESS_TOKEN ? { headers: { Authorization: `Bearer ${ACCESS_TOKEN}` } } : {})
        .then((response) => (response.ok ? response.json() : null))
        .then((state) => {
          const known = fleet.get(hive.id);
          if (state && state.hive && known) { known.plugins = declared(state.hive.plugins); requestRender(); }
        })
        .catch(() => {});
    }
    const cells = Object.entries(w.metrics || {}).sort(([a], [b]) => a.localeCompare(b))
      .flatMap(([key, value]) => {
        const spec = specs.get(key), dt = document.createElement("dt"), dd = document.createElement("dd");
        dt.textContent = key;
        if (spec && spec.help) dt.title = spec.help;
        dd.textContent = figure(value, spec);
        return [dt, dd];
      });
    $("panel-plugins").replaceChildren(...cells);
    $("panel-plugins-title").hidden = cells.length === 0;
  }

  function figure(value, spec) {
    const unit = (spec && spec.unit) || "";
    const text = unit === "bytes" ? mib(value / 1048576)
      : `${Number(value).toLocaleString(undefined, { maximumFractionDigits: 2 })}${unit ? ` ${unit}` : ""}`;
    return spec && spec.as_rate ? `${text}/s` : text;
  }

  async function refreshPanel() {
    const key = panelKey;
    if (key === null) return;
    const [hive, group, ...rest] = key.split("/");
    const selector = { hive, group, instance: rest.join("/"), metric: "cpu_pct,gpu_util_pct,rss_mb,vram_mb" };
    try {
      const [fine, coarse] = await Promise.all([
        history({ ...selector, since: "300", step: "5" }),
        history({ ...selector, since: "21600", step: "300" }),
      ]);
      if (panelKey !== key) return;
      for (const chart of charts.splice(0)) chart.destroy();
      charts.push(chart($("chart-5m"), fine), chart($("chart-6h"), coarse));
    } catch {
      setText($("panel-facts"), "History is not available from this queen.");
    }
  }

  function chart(target, answer) {
    const metrics = [["cpu_pct", "CPU %", "pct"], ["gpu_util_pct", "GPU %", "pct"],
                     ["rss_mb", "RSS MiB", "mib"], ["vram_mb", "VRAM MiB", "mib"]];
    const colours = ["#d98a00", "#3b82c4", "#7a4fb5", "#2f8f5b"];
    const data = [answer.timestamps];
    const series = [{}];
    metrics.forEach(([metric, label, scale], i) => {
      const found = answer.series.find((s) => s.metric === metric);
      data.push(found ? found.values : answer.timestamps.map(() => null));
      series.push({ label, scale, stroke: colours[i], width: 1.5, dash: i % 2 ? [4, 3] : undefined });
    });
    const axis = getComputedStyle(document.documentElement).getPropertyValue("--muted").trim();
    target.replaceChildren();
    return new uPlot({
      width: Math.max(320, target.clientWidth || 640), height: 200, series, legend: { live: false },
      scales: { pct: { range: (u, min, max) => [0, Math.max(100, max || 0)] } },
      axes: [{ stroke: axis }, { scale: "pct", label: "%", stroke: axis },
             { scale: "mib", label: "MiB", side: 1, stroke: axis, grid: { show: false } }],
    }, data, target);
  }

  // -- controls ----------------------------------------------------------------------------

  function setupControls() {
    for (const th of document.querySelectorAll("[role=columnheader][data-key]")) {
      th.querySelector("button").addEventListener("click", () => {
        const key = th.dataset.key;
        sort = { key, dir: sort.key === key ? -sort.dir : (key === "name" || key === "model" ? 1 : -1) };
        for (const other of document.querySelectorAll("[role=columnheader][data-key]")) other.removeAttribute("aria-sort");
        th.setAttribute("aria-sort", sort.dir > 0 ? "ascending" : "descending");
        requestRender();
      });
    }
    document.querySelector('[role=columnheader][data-key="name"]').setAttribute("aria-sort", "ascending");
    for (const id of ["f-hive", "f-model", "f-idle"]) $(id).addEventListener("change", requestRender);
    $("filters").addEventListener("submit", (e) => e.preventDefault());
    $("table-scroll").addEventListener("scroll", requestRender, { passive: true });
    const body = $("worker-rows");
    body.addEventListener("click", (e) => {
      const tr = e.target.closest(".row[data-key]");
      if (tr) openPanel(tr.dataset.key);
    });
    body.addEventListener("keydown", (e) => {
      const tr = e.target.closest(".row[data-key]");
      if (!tr) return;
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); openPanel(tr.dataset.key); }
      const next = e.key === "ArrowDown" ? tr.nextElementSibling : e.key === "ArrowUp" ? tr.previousElementSibling : null;
      if (next && next.dataset.key) { e.preventDefault(); next.focus(); }
    });
    $("panel-close").addEventListener("click", closePanel);
    document.addEventListener("keydown", (e) => { if (e.key === "Escape" && panelKey !== null) closePanel(); });
    const themes = ["auto", "light", "dark"];
    let theme = localStorage.getItem("rbee-theme") || "auto";
    const applyTheme = () => {
      if (theme === "auto") delete document.documentElement.dataset.theme;
      else document.documentElement.dataset.theme = theme;
      $("theme").textContent = `theme: ${theme}`;
    };
    $("theme").addEventListener("click", () => {
      theme = themes[(themes.indexOf(theme) + 1) % themes.length];
      localStorage.setItem("rbee-theme", theme);
      applyTheme();
      if (panelKey !== null) refreshPanel();
    });
    applyTheme();
  }

  window.rbeeDashboard = {
    stats,
    apply, // one stream event, as the queen sends it: how the tests show fields not yet merged
    cells: (key) => (rows.has(key) ? rows.get(key).shown.slice() : null),
    renderTimes: () => stats.times.slice(),
    workerKeys: () => [...order],
  };

  setupControls();
  connect();
  refreshTrends();
  setInterval(refreshTrends, 5000);
  setInterval(() => { if (panelKey !== null) refreshPanel(); }, 5000);
})();
