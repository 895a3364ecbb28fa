// Fine-tuning jobs: the team's newest jobs with live status, progress and time left (refreshed every 2 s).
import {api} from "../api.js";
import {errorBox, formatDate, formatDuration, h, pill, replace, table} from "../dom.js";

const LIST_LIMIT = 50;
const MAX_PROGRESS_LOOKUPS = 10;
const LIVE_STATUSES = new Set(["running", "paused"]);

/** The newest `metrics` event's data of a job, or null (from its last 10 events). */
export async function newestMetrics(jobId, signal) {
  const page = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?limit=10`, {signal});
  const event = page.data.find((e) => e.type === "metrics" && e.data && e.data.total_steps);
  return event ? event.data : null;
}

/** A job's progress cell: "step / total" and a <progress>, 100 % once it succeeded. */
function progressCell(job, metrics) {
  if (job.status === "succeeded") {
    const total = metrics ? metrics.total_steps : 1;
    return h("div", {class: "job-progress"}, h("span", {}, metrics ? `${total} / ${total}` : "100 %"),
      h("progress", {max: total, value: total, "aria-label": `Progress of ${job.id}: 100 %`}));
  }
  if (!metrics) return "—";
  const {step, total_steps: total} = metrics;
  const percent = Math.round((100 * step) / total);
  return h("div", {class: "job-progress"}, h("span", {}, `${step} / ${total}`),
    h("progress", {max: total, value: step, "aria-label": `Progress of ${job.id}: ${percent} %`}));
}

/** Time left until `estimated_finish`, for a job still running. */
function etaCell(job) {
  if (job.status !== "running" || !job.estimated_finish) return "—";
  return formatDuration(job.estimated_finish - Date.now() / 1000);
}

export default {
  title: "Fine-tuning jobs",
  async render(main, _params, ctx) {
    const status = h("div", {id: "jobs-status"});
    const holder = h("div", {id: "jobs-table"}, h("p", {class: "meta"}, "Loading…"));
    const more = h("p", {class: "meta", hidden: true}, `Showing the newest ${LIST_LIMIT} jobs.`);
    replace(main,
      h("div", {class: "page-head"}, h("h1", {}, "Fine-tuning jobs"),
        h("a", {class: "button", href: "#/jobs/new", id: "new-job-link"}, "New job")),
      status, holder, more);

    const metricsOf = new Map();  // job id -> newest metrics seen (kept while a job is paused)
    const columns = [
      ["Job", (j) => h("a", {href: `#/jobs/${encodeURIComponent(j.id)}`, dataset: {job: j.id}}, j.id)],
      ["Status", (j) => pill(j.status)],
      ["Base model", (j) => j.model],
      ["Method", (j) => (j.peft && j.peft.method) || "—"],
      ["Progress", (j) => progressCell(j, metricsOf.get(j.id))],
      ["ETA", etaCell],
      ["Created", (j) => formatDate(j.created_at)],
    ];

    async function refresh() {
      let page;
      try {
        page = await api(`/v1/fine_tuning/jobs?limit=${LIST_LIMIT}`, {signal: ctx.signal});
      } catch (err) {
        if (!ctx.signal.aborted) replace(status, errorBox(err));
        return;
      }
      const live = page.data.filter((j) => LIVE_STATUSES.has(j.status)).slice(0, MAX_PROGRESS_LOOKUPS);
      await Promise.all(live.map(async (job) => {
        try {
          const metrics = await newestMetrics(job.id, ctx.signal);
          if (metrics) metricsOf.set(job.id, metrics);
        } catch { /* progress is best effort; the row still shows */ }
      }));
      if (ctx.signal.aborted) return;
      replace(status);
      // Keep keyboard focus on the same job link across redraws.
      const focused = holder.contains(document.activeElement) ? document.activeElement.dataset.job : null;
      replace(holder, table(columns, page.data, {
        empty: h("span", {}, "No fine-tuning jobs yet. ", h("a", {href: "#/jobs/new"}, "Start one")),
      }));
      if (focused) holder.querySelector(`a[data-job="${CSS.escape(focused)}"]`)?.focus();
      more.hidden = !page.has_more;
    }

    await ctx.every(2000, refresh);
  },
};
