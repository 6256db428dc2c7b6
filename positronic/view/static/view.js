// The page of `positronic view`: reads the server's event stream (/events) and draws either the
// list of sessions or one session. Every string from the authority goes in through textContent,
// never as HTML: pieces are whatever a client wrote.
"use strict";

const $ = (id) => document.getElementById(id);
const PING_S = 10; // the server pings this often; three missed pings mean it is gone
const IDLE_S = 3; // no new version for this long: the session is idle
const SESSION_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/; // as the authority spells one
const MARK_S = 2; // a fresh merge stays outlined, an evicted row struck through, this long

const state = {
  hello: null, // what the stream shows: {session, authority}
  status: null, // the authority link: {state, authority, detail, since_unix_s}
  session: null, // the last session payload
  streamOpen: false,
  lastMessage: Date.now(),
  lastVersion: null,
  lastVersionAt: Date.now(),
  refused: null, // why the page cannot ask for what its URL names
  turnedAway: null, // why the view server last refused the stream ("503: ...")
  marks: new Map(), // seq -> mark, newest kept
  freshUntil: new Map(), // ledger id of a merged row -> until when it is outlined (ms)
  ghosts: [], // rows evicted lately: {text, before, until}
};

function connect() {
  const wanted = new URLSearchParams(location.search).get("session");
  if (wanted && !SESSION_ID.test(wanted)) {
    // The server would refuse the stream (400); say why instead of retrying forever.
    state.refused = `${JSON.stringify(wanted.slice(0, 64))} is not a session id.`;
    drawBanner();
    return;
  }
  const url = "/events" + (wanted ? "?session=" + encodeURIComponent(wanted) : "");
  const source = new EventSource(url);
  const on = (name, fn) =>
    source.addEventListener(name, (e) => {
      state.lastMessage = Date.now();
      fn(JSON.parse(e.data));
      drawBanner();
    });
  on("hello", (h) => {
    state.hello = h;
    state.marks.clear(); // a restarted view server numbers its marks afresh
    state.freshUntil.clear();
    state.ghosts = [];
    $("list").hidden = Boolean(h.session);
    $("session").hidden = !h.session;
    if (h.session) $("sid").textContent = h.session;
    document.title = h.session ? `${h.session} · Positronic view` : "Sessions · Positronic view";
  });
  on("status", (s) => { state.status = s; drawLink(); drawStale(); });
  on("session", drawSession);
  on("sessions", drawList);
  on("ping", () => {});
  source.onopen = () => {
    state.streamOpen = true;
    state.turnedAway = null;
    state.lastMessage = Date.now();
    drawBanner();
  };
  source.onerror = () => {
    state.streamOpen = false;
    drawBanner();
    // A refused stream (an HTTP error) is not retried by EventSource itself, nor does it say
    // why: ask once more by fetch, which reads the answer, then try again.
    if (source.readyState === EventSource.CLOSED) {
      explainRefusal(url).finally(() => setTimeout(connect, 3000));
    }
  };
}

async function explainRefusal(url) {
  const abort = new AbortController();
  try {
    const r = await fetch(url, { signal: abort.signal });
    state.turnedAway = r.ok ? null : `${r.status}: ${(await r.text()).slice(0, 200)}`;
  } catch (e) {
    state.turnedAway = null; // the server is gone: the banner already says so
  } finally {
    abort.abort(); // a stream that did open is not kept
  }
  drawBanner();
}

function clock(unixS) {
  return new Date(unixS * 1000).toLocaleTimeString();
}

function drawLink() {
  const s = state.status;
  const el = $("link");
  el.className = "link " + s.state;
  el.textContent = `${s.authority} · ${s.state}`;
}

function banner() {
  if (state.refused) return ["refused", state.refused];
  const silent = Date.now() - state.lastMessage > 3 * PING_S * 1000;
  if (!state.streamOpen && state.turnedAway) {
    const why = state.turnedAway;
    return ["turned-away", `The view server refused this page (${why}); trying again…`];
  }
  if (!state.streamOpen || silent) {
    return ["server",
      "Lost the view server; reconnecting… The page shows the last state it saw."];
  }
  const s = state.status;
  if (s && s.state === "down") {
    return ["authority",
      `Authority ${s.authority} unreachable since ${clock(s.since_unix_s)} (${s.detail}); ` +
      "retrying. The page shows the last state it saw."];
  }
  if (s && s.state === "connecting") return ["connecting", `Connecting to ${s.authority}…`];
  const p = state.session;
  if (state.hello && state.hello.session && p) {
    if (p.state === "deleted") {
      return ["deleted", `Session ${p.session} was deleted (its last version was ${p.version}).`];
    }
    if (p.state === "missing") {
      return ["missing", `Session ${p.session} is not on the authority; waiting for it to appear.`];
    }
    if (p.problem) return ["problem", `Cannot show session ${p.session}: ${p.problem}; retrying.`];
  }
  return null;
}

function drawBanner() {
  const el = $("banner");
  const b = banner();
  el.hidden = !b;
  if (b) {
    el.dataset.kind = b[0];
    el.textContent = b[1];
  } else {
    delete el.dataset.kind;
  }
  drawStale();
}

function drawStale() {
  const down = !state.streamOpen || (state.status && state.status.state !== "live");
  $("text").classList.toggle("stale", Boolean(down));
}

function drawList(p) {
  const body = $("sessions").tBodies[0];
  body.replaceChildren(
    ...p.sessions.map((s) => {
      const tr = document.createElement("tr");
      const link = document.createElement("a");
      link.href = "?session=" + encodeURIComponent(s.session);
      link.textContent = s.session;
      const cells = [
        link,
        String(s.version),
        `${s.rows} / ${s.target || "?"} / ${s.hard_max || "?"}`,
        s.tokens_per_s == null ? "–" : s.tokens_per_s.toFixed(1),
        s.state,
      ];
      for (const c of cells) {
        const td = document.createElement("td");
        td.append(c);
        tr.append(td);
      }
      tr.dataset.session = s.session;
      return tr;
    }),
  );
  $("no-sessions").hidden = p.sessions.length > 0;
}

// What a merged row replaced: the authority's replaced_text when it has one, else its two
// direct parents (id and the piece the view saw for it).
function replacedText(r) {
  if (r.replaced_text) return JSON.stringify(r.replaced_text);
  return r.replaced_ids
    .map((id, k) => (r.replaced_pieces[k] == null ? `#${id}` : JSON.stringify(r.replaced_pieces[k])))
    .join(" + ");
}

function tokenTitle(t, i) {
  let title = `row ${i} · ${t.source} · id ${t.token} · piece ${JSON.stringify(t.piece)}` +
    ` · brightness ${t.brightness}`;
  if ("replaced_text" in t) {
    title += `\nmerged at version ${t.merged_at}; replaced ${replacedText(t)}` +
      ` (ids ${t.replaced_ids.join(", ")})`;
  }
  return title;
}

function tokenSpan(t, i, fresh) {
  const span = document.createElement("span");
  span.className = "tok " + t.source;
  span.textContent = t.text || "\u200b"; // a byte row that completes no character yet
  if (!t.text) span.classList.add("partial");
  if ("replaced_text" in t) {
    span.classList.add("merged");
    span.dataset.replaced = replacedText(t);
  }
  if (fresh.has(t.ledger)) span.classList.add("fresh");
  span.dataset.ledger = t.ledger;
  span.style.backgroundColor = `rgba(255, 176, 0, ${(0.04 + 0.81 * t.shade).toFixed(3)})`;
  span.title = tokenTitle(t, i);
  return span;
}

function ghostSpan(g) {
  const span = document.createElement("span");
  span.className = "ghost";
  span.textContent = g.text || "\u2205";
  span.title = "evicted since the last refresh";
  return span;
}

function drawSession(p) {
  state.session = p;
  if (p.version !== state.lastVersion) {
    state.lastVersion = p.version;
    state.lastVersionAt = Date.now();
  }
  $("sid").textContent = p.session;
  $("version").textContent = p.version;
  $("rows").textContent = p.rows;
  $("target").textContent = p.target || "?";
  $("hard-max").textContent = p.hard_max || "?";
  $("fill").value = p.hard_max ? p.rows / p.hard_max : 0;
  $("merges").textContent = p.merges_seen;
  $("evictions").textContent = p.evictions_seen;
  if (p.brightness_range) {
    $("lo").textContent = p.brightness_range[0].toFixed(1);
    $("hi").textContent = p.brightness_range[1].toFixed(1);
  }
  drawRate();

  // Marks outlive the refresh that reported them, so that a fast session's are seen.
  const now = Date.now();
  for (const ledger of p.fresh) state.freshUntil.set(ledger, now + MARK_S * 1000);
  for (const g of p.ghosts) state.ghosts.push({ ...g, until: now + MARK_S * 1000 });
  for (const [ledger, until] of state.freshUntil) if (until < now) state.freshUntil.delete(ledger);
  const alive = new Set(p.tokens.map((t) => t.ledger));
  state.ghosts = state.ghosts.filter(
    (g) => g.until >= now && (g.before == null || alive.has(g.before)),
  );
  const fresh = new Set(state.freshUntil.keys());
  const ghostsBefore = new Map(); // ledger id of the next row (or "end") -> ghosts
  for (const g of state.ghosts) {
    const key = g.before == null ? "end" : g.before;
    if (!ghostsBefore.has(key)) ghostsBefore.set(key, []);
    ghostsBefore.get(key).push(g);
  }
  const nodes = [];
  p.tokens.forEach((t, i) => {
    for (const g of ghostsBefore.get(t.ledger) || []) nodes.push(ghostSpan(g));
    nodes.push(tokenSpan(t, p.hidden_rows + i, fresh));
  });
  $("hidden-rows").hidden = !p.hidden_rows;
  $("hidden-rows").textContent =
    `… the oldest ${p.hidden_rows} rows are not shown ` +
    `(the page shows the newest ${p.tokens.length}).`;
  for (const g of ghostsBefore.get("end") || []) nodes.push(ghostSpan(g));
  const text = $("text");
  text.replaceChildren(...nodes);
  text.dataset.version = p.snapshot_version == null ? "" : p.snapshot_version;
  text.classList.toggle("ended", p.state !== "live");
  drawMarks(p.marks);
}

function drawRate() {
  const p = state.session;
  if (!p) return;
  const idle = (Date.now() - state.lastVersionAt) / 1000 > IDLE_S;
  $("rate").textContent = idle ? "0 (idle)" :
    p.tokens_per_s == null ? "–" : p.tokens_per_s.toFixed(1);
}

function drawMarks(marks) {
  for (const m of marks) state.marks.set(m.seq, m);
  const seqs = [...state.marks.keys()].sort((a, b) => b - a);
  for (const seq of seqs.slice(40)) state.marks.delete(seq);
  $("marks").replaceChildren(
    ...seqs.slice(0, 40).map((seq) => {
      const m = state.marks.get(seq);
      const li = document.createElement("li");
      li.className = m.kind;
      const what = document.createElement("b");
      if (m.kind === "merge") {
        what.textContent = "merged";
        li.append(`v${m.version} `, what, ` ${replacedText(m)} → ${JSON.stringify(m.text)}`);
      } else {
        what.textContent = "evicted";
        li.append(`by v${m.version} `, what, ` ${JSON.stringify(m.text)}`);
      }
      return li;
    }),
  );
}

setInterval(() => { drawRate(); drawBanner(); }, 1000);
connect();
