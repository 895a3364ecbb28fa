// Fleet (admin): training workers, the training queue across teams and the inference replicas, every 3 s.
import {api} from "../api.js";
import {errorBox, formatDate, formatDuration, formatNumber, h, pill, replace, table} from "../dom.js";

const REFRESH_MS = 3000;
// Counters shown in a replica's summary line; every other numeric counter is in its details.
const HEADLINE_COUNTERS = ["requests", "generated_tokens", "adapter_loads"];

/** "12 s ago" from epoch seconds. */
function ago(seconds) {
  if (!seconds) return "—";
  return `${formatDuration(Date.now() / 1000 - seconds)} ago`;
}

/** "in 3 min" / "5 s ago" for a time that may be ahead. */
function fromNow(seconds) {
  if (!seconds) return "—";
  const delta = seconds - Date.now() / 1000;
  return delta >= 0 ? `in ${formatDuration(delta)}` : ago(seconds);
}

function stat(value, label) {
  return h("div", {class: "stat"}, h("strong", {}, String(value)), h("span", {}, label));
}

/** A section's slot: the table, or why it could not be loaded (404: the API has no such endpoint). */
function failure(err, what) {
  if (err.status === 404) return h("p", {class: "empty"}, `This API does not report ${what}.`);
  return errorBox(err);
}

function workersTable(workers) {
  return table([
    ["Worker", (w) => h("code", {}, w.id)],
    ["Concurrency", (w) => String(w.concurrency)],
    ["Started", (w) => formatDate(w.started_at)],
    ["Last heartbeat", (w) => ago(w.heartbeat_at)],
  ], workers.data, {empty: "No training worker is running: queued jobs wait until one starts."});
}

function queueTable(queue) {
  return table([
    ["Team", (t) => t.team],
    ["Running", (t) => String(t.running)],
    ["Queued", (t) => String(t.queued)],
    ["Paused", (t) => String(t.paused)],
    ["Oldest queued", (t) => (t.oldest_queued_at ? ago(t.oldest_queued_at) : "—")],
  ], queue.teams, {empty: "No team has a job running, queued or paused."});
}

function runningTable(queue, myTeam) {
  return table([
    // Only the signed-in team's jobs can be opened: other teams' jobs are not visible to this key.
    ["Job", (j) => (j.team === myTeam ? h("a", {href: `#/jobs/${encodeURIComponent(j.id)}`}, j.id) : h("code", {}, j.id))],
    ["Team", (j) => j.team],
    ["Model", (j) => j.model],
    ["Worker", (j) => (j.worker ? h("code", {}, j.worker) : "—")],
    ["Started", (j) => ago(j.started_at)],
    ["Estimated finish", (j) => fromNow(j.estimated_finish)],
  ], queue.running, {empty: "No job is running."});
}

/** A replica's numeric counters: the main ones inline, every one in a disclosure (kept open across refreshes). */
function counters(replicaId, stats, openCounters) {
  const numeric = Object.entries(stats || {}).filter(([, v]) => typeof v === "number");
  if (!numeric.length) return "—";
  const headline = HEADLINE_COUNTERS.filter((k) => typeof stats[k] === "number")
    .map((k) => `${k.replace(/_/g, " ")} ${formatNumber(stats[k], 6)}`).join(" · ");
  const details = h("details", {class: "counters", open: openCounters.has(replicaId)},
    h("summary", {dataset: {replica: replicaId}}, headline || `${numeric.length} counters`),
    h("ul", {}, numeric.map(([k, v]) => h("li", {}, `${k.replace(/_/g, " ")}: ${formatNumber(v, 6)}`))));
  details.addEventListener("toggle", () => {
    if (details.open) openCounters.add(replicaId); else openCounters.delete(replicaId);
  });
  return details;
}

function replicasTable(replicas, openCounters) {
  return table([
    ["Replica", (r) => h("div", {}, h("code", {}, r.id), h("div", {class: "meta"}, r.url || "—"))],
    ["Engine", (r) => `${r.engine} (${r.source})`],
    ["Base model", (r) => r.base_model],
    ["State", (r) => pill(r.state)],
    ["Resident adapters", (r) => h("div", {},
      `${r.resident_adapters.length} / ${r.max_resident_adapters}`,
      r.resident_adapters.length ? h("ul", {class: "resident"}, r.resident_adapters.map((a) => h("li", {}, h("code", {}, a)))) : null)],
    ["Load", (r) => `${r.load} in flight (batch ${r.max_batch})`],
    ["Counters", (r) => counters(r.id, r.stats, openCounters)],
    ["Last heartbeat", (r) => ago(r.heartbeat_at)],
  ], replicas.data, {empty: "No inference replica is live: chat and completions answer 503 until one starts."});
}

function summary(workers, queue, replicas) {
  const items = [];
  if (workers) items.push(stat(workers.data.length, "training workers"), stat(workers.capacity, "job slots"));
  if (queue) {
    const sum = (key) => queue.teams.reduce((n, t) => n + t[key], 0);
    items.push(stat(sum("running"), "jobs running"), stat(sum("queued"), "queued"), stat(sum("paused"), "paused"));
  }
  if (replicas) {
    const ready = replicas.data.filter((r) => r.state === "ready").length;
    const inFlight = replicas.data.reduce((n, r) => n + r.load, 0);
    items.push(stat(`${ready} / ${replicas.data.length}`, "replicas ready"), stat(inFlight, "generations in flight"));
  }
  return items;
}

export default {
  title: "Fleet",
  admin: true,
  async render(main, _params, ctx) {
    const slots = {
      summary: h("div", {class: "stats card", id: "fleet-summary", "aria-live": "polite"}),
      workers: h("div", {id: "workers-table"}),
      queue: h("div", {id: "queue-table"}),
      running: h("div", {id: "running-table"}),
      replicas: h("div", {id: "replicas-table"}),
      updated: h("p", {class: "meta", id: "fleet-updated"}),
    };
    const openCounters = new Set();  // replica ids whose counters are shown in full
    replace(main,
      h("div", {class: "page-head"}, h("h1", {}, "Fleet"), slots.updated),
      slots.summary,
      h("h2", {}, "Training workers"), slots.workers,
      h("h2", {}, "Training queue by team"), slots.queue,
      h("h2", {}, "Running jobs"), slots.running,
      h("h2", {}, "Inference replicas"), slots.replicas);

    /** One refresh: the three endpoints at once; each section shows its own failure. */
    async function refresh() {
      const [workers, queue, replicas] = await Promise.allSettled(
        ["/v1/workers", "/v1/queue", "/v1/replicas"].map((path) => api(path, {signal: ctx.signal})));
      if (ctx.signal.aborted) return;
      const ok = (r) => (r.status === "fulfilled" ? r.value : null);
      if (workers.status === "fulfilled") replace(slots.workers, workersTable(workers.value));
      else replace(slots.workers, failure(workers.reason, "its training workers"));
      if (queue.status === "fulfilled") {
        replace(slots.queue, queueTable(queue.value));
        replace(slots.running, runningTable(queue.value, ctx.identity.team.name));
      } else {
        replace(slots.queue, failure(queue.reason, "its training queue"));
        replace(slots.running);
      }
      // Keep keyboard focus on a replica's counters when its table is rebuilt.
      const focused = slots.replicas.contains(document.activeElement) ? document.activeElement.dataset.replica : null;
      if (replicas.status === "fulfilled") replace(slots.replicas, replicasTable(replicas.value, openCounters));
      else replace(slots.replicas, failure(replicas.reason, "its inference replicas"));
      if (focused) {
        const again = [...slots.replicas.querySelectorAll("summary")].find((el) => el.dataset.replica === focused);
        if (again) again.focus({preventScroll: true});
      }
      replace(slots.summary, summary(ok(workers), ok(queue), ok(replicas)));
      replace(slots.updated, `Updated ${new Date().toLocaleTimeString()} · every ${REFRESH_MS / 1000} s`);
    }

    await ctx.every(REFRESH_MS, refresh);
  },
};
