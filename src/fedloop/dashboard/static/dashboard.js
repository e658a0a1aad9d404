// The dashboard page: polls /v1/dashboard, keeps every round it has seen, redraws what changed.
// Everything from the server is written with textContent: agent names are untrusted input.

import { format, lineChart } from "./chart.js";

const POLL_MS = 1000;
const RETRY_MS = 5000;

const state = {
  rounds: new Map(), // round -> summary, as /v1/dashboard sends it
  since: -1, // the newest round held; the server sends only newer ones
  data: null,
  fetchedAt: 0, // performance.now() of the last answer, to count the deadline down between polls
  chartsKey: "",
  timer: null,
  busy: false, // a request is in flight: a second poll loop must not start
};

const $ = (id) => document.getElementById(id);

// With auth on, the data needs an admin token: open the page as /#token=fla_… once; the token
// is kept for this tab only (sessionStorage) and taken out of the address bar.
const TOKEN_KEY = "fedloop-admin-token";
(() => {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function setText(id, value) {
  const node = $(id);
  const text = String(value);
  if (node.textContent !== text) node.textContent = text;
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m} min ${Math.floor(seconds % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  return seconds < 1 ? "just now" : `${duration(seconds)} ago`;
}

function elapsed() {
  return (performance.now() - state.fetchedAt) / 1000;
}

function renderStatus() {
  const d = state.data;
  const s = d.status;
  const pill = $("run-state");
  const phase = s.finished ? "finished" : s.round === 0 ? "waiting for agents" : "running";
  pill.textContent = phase;
  pill.className = `pill ${s.finished ? "finished" : "running"}`;
  setText("strategy", s.asynchronous ? `${s.strategy} (asynchronous)` : s.strategy);
  // A finished run has no open round: show the last one.
  setText("round", s.finished ? s.global_round : s.round);
  setText("rounds-planned", d.rounds_planned ? ` of ${d.rounds_planned}` : "");
  setText("global-round", s.global_round < 0 ? "none" : s.global_round);
  setText("uploads", s.uploads);
  setText("needed", s.needed);
  const progress = $("progress");
  progress.max = Math.max(1, s.needed);
  progress.value = Math.min(s.uploads, s.needed);
  setText("agents-connected", d.agents_connected);
  setText("agents-total", d.agents_total);
  setText("bytes-in", bytes(d.stats.bytes_in ?? 0));
  setText("bytes-out", bytes(d.stats.bytes_out ?? 0));
  setText("uploads-total", d.stats.uploads ?? 0);
  setText("rejected", d.stats.rejected ?? 0);
  renderClock();
}

// Between two polls the deadline and the round's age keep moving on the page's own clock.
function renderClock() {
  const d = state.data;
  if (!d) return;
  const s = d.status;
  if (s.finished) {
    setText("deadline", "done");
  } else if (s.deadline_in === null || s.deadline_in === undefined) {
    setText("deadline", "no deadline");
  } else {
    setText("deadline", duration(Math.max(0, s.deadline_in - elapsed())));
  }
  const open = d.round_started && !s.finished && s.round > 0;
  setText("round-age", open ? `open for ${duration(d.now - d.round_started + elapsed())}` : "");
}

function renderAgents() {
  const d = state.data;
  const body = $("agents").tBodies[0];
  const rows = d.agents.map((a) => {
    const tr = document.createElement("tr");
    tr.dataset.agent = a.name;
    const name = document.createElement("td");
    name.textContent = a.name;
    const status = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = `badge ${a.status}`;
    badge.textContent = a.status;
    status.appendChild(badge);
    const round = document.createElement("td");
    round.textContent = a.uploaded ? "uploaded" : "–";
    const seen = document.createElement("td");
    seen.textContent = ago(a.last_seen_ago);
    if (a.last_seen) seen.title = new Date(a.last_seen * 1000).toLocaleString();
    tr.append(name, status, round, seen);
    return tr;
  });
  body.replaceChildren(...rows);
  const more = $("agents-more");
  more.hidden = d.agents_total <= d.agents.length;
  more.textContent = `and ${d.agents_total - d.agents.length} more`;
}

function seriesOf(rounds, pick) {
  return rounds
    .map((r) => [r.round, pick(r)])
    .filter(([, v]) => typeof v === "number" && Number.isFinite(v));
}

function renderCharts() {
  const rounds = [...state.rounds.values()].sort((a, b) => a.round - b.round);
  const key = rounds.length ? `${rounds.length}:${rounds[rounds.length - 1].round}` : "";
  if (key === state.chartsKey) return;
  state.chartsKey = key;
  const figures = [];
  const globalKeys = [...new Set(rounds.flatMap((r) => Object.keys(r.global_metrics)))].sort();
  for (const name of globalKeys) {
    figures.push(
      lineChart(`global model: ${name}`, `global.${name}`, [
        { name: "global", points: seriesOf(rounds, (r) => r.global_metrics[name]) },
      ]),
    );
  }
  const localKeys = [...new Set(rounds.flatMap((r) => Object.keys(r.local_metrics_mean)))].sort();
  const agents = [...new Set(rounds.flatMap((r) => Object.keys(r.local_metrics)))].sort();
  const perAgent = agents.length <= (state.data?.max_agent_series ?? 20);
  for (const name of localKeys) {
    const series = perAgent
      ? agents.map((a) => ({
          name: a,
          points: seriesOf(rounds, (r) => r.local_metrics[a]?.[name]),
        }))
      : [];
    series.push({
      name: "mean",
      mean: true,
      points: seriesOf(rounds, (r) => r.local_metrics_mean[name]),
    });
    figures.push(lineChart(`local training: ${name}`, `local.${name}`, series));
  }
  const aggregated = rounds.filter((r) => r.round > 0);
  if (aggregated.length) {
    figures.push(
      lineChart("round duration (s)", "round.seconds", [
        { name: "seconds", points: seriesOf(aggregated, (r) => r.seconds) },
      ]),
    );
  }
  $("charts").replaceChildren(...figures);
  $("charts-empty").hidden = aggregated.length > 0 || figures.length > 0;
}

async function poll() {
  clearTimeout(state.timer);
  if (state.busy) return;
  state.busy = true;
  let next = POLL_MS;
  try {
    const response = await fetch(`v1/dashboard?since=${state.since}`, {
      cache: "no-store",
      headers: authHeaders(),
    });
    if (response.status === 401 || response.status === 403) {
      throw new Error("an admin token is needed: open this page as /#token=<fedloop token admin>");
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const data = await response.json();
    // A smaller global round than we hold: the aggregator was started on other data.
    if (data.status.global_round < state.since) {
      state.rounds.clear();
      state.since = -1;
      state.chartsKey = "";
      next = 0;
    }
    for (const r of data.rounds) {
      state.rounds.set(r.round, r);
      state.since = Math.max(state.since, r.round);
    }
    state.data = data;
    state.fetchedAt = performance.now();
    renderStatus();
    renderAgents();
    renderCharts();
    setText("link-state", `updated ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    $("run-state").textContent = "aggregator unreachable";
    $("run-state").className = "pill offline";
    setText("link-state", `retrying in ${RETRY_MS / 1000} s (${error.message})`);
    next = RETRY_MS;
  }
  state.busy = false;
  if (!document.hidden) state.timer = setTimeout(poll, next);
}

document.addEventListener("visibilitychange", () => {
  if (!document.hidden) poll();
});
setInterval(renderClock, 250);
poll();
