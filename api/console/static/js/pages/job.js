// One fine-tuning job: its header and controls, a live loss chart and stats from its event stream,
// the events log, its checkpoints and its resolved hyperparameters.
import {api, listAll, streamEvents} from "../api.js";
import {
  confirmAction, errorBox, formatDate, formatDuration, formatNumber, h, pill, replace, table, toast,
} from "../dom.js";
import {LossSeries, chartLayout} from "../loss_chart.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
/** Which statuses allow each control (core/job_lifecycle.py's TRANSITIONS). */
const ALLOWED = {
  cancel: new Set(["validating_files", "queued", "running", "paused"]),
  pause: new Set(["validating_files", "queued", "running"]),
  resume: new Set(["paused"]),
};
const MAX_LOG = 500;
const REDRAW_MS = 250;

function definitionList(entries) {
  return h("dl", {class: "job-kv"}, entries.filter(Boolean).map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
}

/** A hyperparameter value, readable: lists joined, objects as JSON, unset as a dash. */
function valueText(value) {
  if (value === null || value === undefined) return "—";
  if (Array.isArray(value)) return value.join(", ");
  if (typeof value === "object") return h("pre", {}, JSON.stringify(value, null, 2));
  return String(value);
}

function fileLink(id) {
  return id ? h("a", {href: `#/files/${encodeURIComponent(id)}`}, id) : "—";
}

function metricsText(metrics) {
  const parts = Object.entries(metrics || {}).filter(([k, v]) => k !== "step" && v !== null && typeof v !== "object")
    .map(([k, v]) => `${k.replace(/_/g, " ")} ${typeof v === "number" ? formatNumber(v) : v}`);
  return parts.length ? parts.join(" · ") : "—";
}

export default {
  title: "Fine-tuning job",
  async render(main, [jobId], ctx) {
    const {signal} = ctx;
    const base = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
    let job;
    try {
      job = await api(base, {signal});
    } catch (err) {
      if (signal.aborted) return;
      replace(main, h("h1", {}, "Fine-tuning job"), errorBox(err),
        h("p", {}, h("a", {href: "#/jobs"}, "Back to all jobs")));
      return;
    }

    // ---- the page's parts ------------------------------------------------------------------
    const statusPill = h("span", {id: "job-status"});
    const buttons = {
      pause: h("button", {type: "button", id: "pause-job", class: "secondary"}, "Pause"),
      resume: h("button", {type: "button", id: "resume-job", class: "secondary"}, "Resume"),
      cancel: h("button", {type: "button", id: "cancel-job", class: "danger"}, "Cancel job"),
    };
    const actionStatus = h("div", {id: "job-action-status"});
    const refreshStatus = h("div", {id: "job-refresh-status"});
    const errorSlot = h("div", {id: "job-error"});
    const summary = h("div", {id: "job-summary"});
    const stats = h("div", {class: "stats", id: "job-stats"});
    const chart = h("div", {id: "loss-chart", class: "chart", role: "img",
      "aria-label": "Training and validation loss and learning rate per step", dataset: {points: "0", validPoints: "0"}});
    const chartNote = h("p", {class: "meta", id: "chart-note"}, "No training metrics yet.");
    const streamStatus = h("div", {id: "stream-status"});
    const log = h("ol", {id: "events-log", class: "log events-log", tabindex: 0, "aria-label": "Events, newest first"});
    const logEmpty = h("p", {class: "empty"}, "No events yet.");
    const checkpoints = h("div", {id: "job-checkpoints"}, h("p", {class: "meta"}, "Loading…"));
    const hyper = h("div", {id: "job-hyperparameters", class: "columns"},
      h("section", {}, h("h3", {}, "Hyperparameters"), definitionList(Object.entries(job.hyperparameters || {})
        .map(([k, v]) => [k, valueText(v)]))),
      h("section", {}, h("h3", {}, "PEFT"), definitionList(Object.entries(job.peft || {})
        .filter(([, v]) => v !== null && v !== undefined).map(([k, v]) => [k, valueText(v)])),
      h("p", {class: "meta"}, "Options left unset are not listed.")));

    replace(main,
      h("div", {class: "page-head job-head"},
        h("div", {}, h("h1", {}, "Fine-tuning job"), h("p", {class: "job-id"}, h("code", {}, job.id), " ", statusPill)),
        h("div", {class: "actions"}, buttons.pause, buttons.resume, buttons.cancel)),
      actionStatus, refreshStatus, errorSlot,
      h("section", {class: "card"}, summary),
      h("section", {class: "card"}, h("h2", {}, "Training"), stats, streamStatus, chartNote, chart),
      h("div", {class: "columns"},
        h("section", {class: "card"}, h("h2", {}, "Events"), logEmpty, log),
        h("section", {class: "card"}, h("h2", {}, "Checkpoints"), checkpoints)),
      h("section", {class: "card"}, h("h2", {}, "Resolved hyperparameters"), hyper));

    // ---- header, status and controls --------------------------------------------------------
    let busy = false;
    let headerKey = "";
    function updateButtons() {
      for (const [action, button] of Object.entries(buttons)) button.disabled = busy || !ALLOWED[action].has(job.status);
    }
    function showJob(next) {
      job = next;
      updateButtons();
      showStats();  // the ETA counts down with each refresh
      const key = JSON.stringify([job.status, job.fine_tuned_model, job.finished_at, job.trained_tokens, job.error]);
      if (key === headerKey) return;
      headerKey = key;
      replace(statusPill, pill(job.status));
      const model = job.fine_tuned_model;
      replace(summary, definitionList([
        ["Base model", job.model],
        ["Training file", fileLink(job.training_file)],
        ["Validation file", fileLink(job.validation_file)],
        model && ["Fine-tuned model", h("span", {},
          h("a", {href: `#/playground?model=${encodeURIComponent(model)}`, id: "job-model-link"}, model),
          " · ", h("a", {href: "#/registry"}, "registry"))],
        ["Created", formatDate(job.created_at)],
        ["Finished", formatDate(job.finished_at)],
        job.trained_tokens && ["Trained tokens", job.trained_tokens.toLocaleString()],
        ["Seed", String(job.seed)],
        job.suffix && ["Suffix", job.suffix],
      ]));
      replace(errorSlot, job.status === "failed" && job.error ? errorBox({error: job.error}) : null);
      scheduleDraw();
    }

    const labels = {pause: "Job paused.", resume: "Job resumed.", cancel: "Job cancelled."};
    async function act(action) {
      if (action === "cancel" && !(await confirmAction(`Cancel job ${job.id}? A cancelled job cannot be resumed.`,
        {confirmLabel: "Cancel job"}))) return;
      busy = true;
      updateButtons();
      replace(actionStatus);
      try {
        showJob(await api(`${base}/${action}`, {method: "POST", signal}));
        toast(labels[action]);
      } catch (err) {
        if (!signal.aborted) replace(actionStatus, errorBox(err));
      } finally {
        busy = false;
        updateButtons();
      }
    }
    for (const [action, button] of Object.entries(buttons)) button.addEventListener("click", () => act(action));

    // ---- events: chart, stats, log ----------------------------------------------------------
    const series = new LossSeries();
    const seen = new Set();
    let pending = [];
    let latest = null;       // newest metrics data
    let latestValid = null;  // newest non-null validation loss
    let drawTimer = null;
    let lastDraw = 0;
    let revision = 0;
    let wasNarrow = null;

    function showStats() {
      const m = latest || {};
      const running = job.status === "running";
      const eta = running && job.estimated_finish ? job.estimated_finish - Date.now() / 1000 : running ? m.eta_seconds : null;
      const stat = (label, value) => h("div", {class: "stat"}, h("strong", {}, value), h("span", {}, label));
      replace(stats,
        stat("Step", latest ? `${m.step} / ${m.total_steps}` : "—"),
        stat("Epoch", latest ? formatNumber(m.epoch, 3) : "—"),
        stat("Tokens / s", latest && m.tokens_per_second ? Math.round(m.tokens_per_second).toLocaleString() : "—"),
        stat("ETA", formatDuration(eta)),
        stat("Train loss", latest ? formatNumber(m.train_loss) : "—"),
        job.validation_file ? stat("Validation loss", formatNumber(latestValid)) : null);
    }

    function logEntry(event) {
      return h("li", {class: `level-${String(event.level).replace(/[^a-z]/gi, "")}`},
        h("time", {datetime: new Date(event.created_at * 1000).toISOString()}, formatDate(event.created_at)),
        " ", event.level !== "info" ? pill(event.level) : null, " ", h("span", {class: "message"}, event.message));
    }

    function draw() {
      drawTimer = null;
      lastDraw = Date.now();
      if (signal.aborted) return;
      if (pending.length) {
        log.prepend(...pending.slice(-MAX_LOG).reverse().map(logEntry));
        while (log.children.length > MAX_LOG) log.lastElementChild.remove();
        pending = [];
      }
      logEmpty.hidden = log.children.length > 0;
      showStats();
      const points = series.train.x.length;
      const validPoints = series.valid.x.length;
      chartNote.hidden = points > 0;
      chartNote.textContent = TERMINAL.has(job.status) ? "This job recorded no training metrics." : "No training metrics yet.";
      // A job that ended before training has no chart to show.
      chart.hidden = points === 0 && TERMINAL.has(job.status);
      if (chart.hidden) return;
      if (!window.Plotly) {
        chartNote.hidden = false;
        chartNote.textContent = "The chart library did not load; the stats above still update.";
        return;
      }
      const narrow = chart.clientWidth < 600;
      wasNarrow = narrow;
      window.Plotly.react(chart, series.traces(Boolean(job.validation_file)), chartLayout(narrow, points === 0, ++revision),
        {responsive: true, displaylogo: false}).then(() => {
        chart.dataset.points = String(points);
        chart.dataset.validPoints = String(validPoints);
      }, (err) => { if (!signal.aborted) replace(streamStatus, errorBox(err)); });
    }

    function scheduleDraw() {
      if (drawTimer || signal.aborted) return;
      drawTimer = setTimeout(draw, Math.max(0, REDRAW_MS - (Date.now() - lastDraw)));
    }

    function addEvent(event) {
      if (!event || !event.id || seen.has(event.id)) return;
      seen.add(event.id);
      pending.push(event);
      if (event.type === "metrics" && event.data) {
        series.add(event.data);
        latest = event.data;
        if (event.data.valid_loss !== null && event.data.valid_loss !== undefined) latestValid = event.data.valid_loss;
      } else if (/checkpoint/i.test(event.message || "")) {
        loadCheckpoints();
      }
      scheduleDraw();
    }

    // ---- checkpoints ------------------------------------------------------------------------
    async function loadCheckpoints() {
      try {
        const page = await api(`${base}/checkpoints?limit=20`, {signal});
        replace(checkpoints, table([
          ["Step", (c) => String(c.step_number)],
          ["Metrics", (c) => metricsText(c.metrics)],
          ["Created", (c) => formatDate(c.created_at)],
          ["Model", (c) => h("code", {class: "wrap"}, c.fine_tuned_model_checkpoint)],
        ], page.data, {empty: "No checkpoints yet."}), page.has_more ? h("p", {class: "meta"}, "The newest 20.") : null);
      } catch (err) {
        if (!signal.aborted) replace(checkpoints, errorBox(err));
      }
    }

    // ---- live updates -----------------------------------------------------------------------
    let finalRefreshDone = TERMINAL.has(job.status);
    async function refreshJob() {
      if (finalRefreshDone) return;
      try {
        showJob(await api(base, {signal}));
        replace(refreshStatus);
        if (TERMINAL.has(job.status)) {
          finalRefreshDone = true;
          loadCheckpoints();
        }
      } catch (err) {
        if (!signal.aborted) replace(refreshStatus, errorBox(err));
      }
    }

    let pollStarted = false;
    let pollDone = false;
    async function pollEvents() {
      if (pollDone) return;
      const finished = TERMINAL.has(job.status);
      try {
        const events = pollStarted
          ? (await api(`${base}/events?limit=100`, {signal})).data
          : await listAll(`${base}/events?limit=100`, {signal, max: 5000});
        pollStarted = true;
        for (const event of events.reverse()) addEvent(event);
        if (finished) pollDone = true;  // one poll after the job ended catches its last events
      } catch (err) {
        if (!signal.aborted) replace(streamStatus, errorBox(err));
      }
    }

    function fallBack(...why) {
      replace(streamStatus, ...why, h("p", {class: "meta"}, "Live updates fall back to polling every 2 s."));
      ctx.every(2000, pollEvents);
    }

    /** Follow the SSE stream (every event, then live ones, until the job ends); poll if it fails. */
    async function follow() {
      try {
        for await (const event of streamEvents(`${base}/events?stream=true`, {signal})) addEvent(event);
        if (signal.aborted) return;
        await refreshJob();  // the stream ends when the job does
        if (!TERMINAL.has(job.status)) fallBack(h("p", {class: "meta"}, "The live stream ended early."));
      } catch (err) {
        if (signal.aborted || (err && err.name === "AbortError")) return;
        fallBack(errorBox(err));
      }
    }

    // Redraw when the chart crosses the phone breakpoint (the legend moves below the plot).
    const resizes = new ResizeObserver(() => {
      if (wasNarrow !== null && (chart.clientWidth < 600) !== wasNarrow) scheduleDraw();
    });
    resizes.observe(chart);
    signal.addEventListener("abort", () => {
      resizes.disconnect();
      clearTimeout(drawTimer);
      if (window.Plotly) window.Plotly.purge(chart);
    });
    showJob(job);
    draw();
    follow();
    ctx.every(2000, refreshJob);
    let checkpointsFinal = false;
    ctx.every(10000, async () => {
      if (checkpointsFinal) return;
      checkpointsFinal = TERMINAL.has(job.status);
      await loadCheckpoints();
    });
  },
};
