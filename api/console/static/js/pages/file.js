// One dataset file: its stats, a pretty preview of its first lines, its line errors, and its actions.
import {api, downloadFile} from "../api.js";
import {confirmAction, errorBox, formatBytes, formatDate, h, pill, replace} from "../dom.js";

const PREVIEW_ROWS = 20;

function stat(label, value, attrs = {}) {
  return h("div", {class: "stat"}, h("strong", attrs, value), h("span", {}, label));
}

function labelled(label, text) {
  return h("div", {class: "example-part"}, h("span", {class: "example-label"}, label), h("div", {class: "example-text"}, text));
}

/** Shown when a value is not the string the format expects (the line is then invalid anyway). */
const asText = (value) => (typeof value === "string" ? value : JSON.stringify(value, null, 2));

/** One example laid out by its format (the same key rules as core/datasets.py's detect_format). */
function chatMessages(messages, labelOf = null) {
  return messages.map((m) => {
    const role = m && typeof m === "object" ? String(m.role ?? "?") : "?";
    const weightOff = m && m.weight === 0 ? " (weight 0: not learned)" : "";
    const label = labelOf ? labelOf(role) : `${role}${m && m.name ? ` · ${m.name}` : ""}${weightOff}`;
    return h("div", {class: `example-part message role-${role.replace(/[^a-z]/gi, "")}`},
      h("span", {class: "example-label"}, label),
      h("div", {class: "example-text"}, m && typeof m === "object" ? asText(m.content ?? "") : asText(m)));
  });
}

function prettyExample(obj) {
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) return h("pre", {}, JSON.stringify(obj, null, 2));
  if ("preferred_output" in obj || "non_preferred_output" in obj) {
    const input = obj.input && typeof obj.input === "object" && Array.isArray(obj.input.messages) ? obj.input.messages : [];
    const outputs = (key, label) => (Array.isArray(obj[key]) ? chatMessages(obj[key], (role) => `${label} (${role})`) : []);
    return h("div", {class: "example chat preference"}, chatMessages(input),
      outputs("preferred_output", "preferred"), outputs("non_preferred_output", "not preferred"));
  }
  if ("messages" in obj && Array.isArray(obj.messages)) return h("div", {class: "example chat"}, chatMessages(obj.messages));
  if ("prompt" in obj || "completion" in obj) {
    return h("div", {class: "example"}, labelled("prompt", asText(obj.prompt ?? "")),
      labelled("completion", asText(obj.completion ?? "")));
  }
  if ("instruction" in obj || "output" in obj) {
    return h("div", {class: "example"}, labelled("instruction", asText(obj.instruction ?? "")),
      "input" in obj ? labelled("input", asText(obj.input)) : null, labelled("output", asText(obj.output ?? "")));
  }
  if ("text" in obj) return h("div", {class: "example"}, labelled("text", asText(obj.text)));
  return h("pre", {}, JSON.stringify(obj, null, 2));
}

/** A preview row: its line number, the example laid out (or the raw line when it is not JSON), its error. */
function previewRow(row) {
  let body;
  try {
    body = prettyExample(JSON.parse(row.text));
  } catch {
    body = h("pre", {class: "raw"}, row.text);
  }
  return h("li", {class: row.error ? "preview-row has-error" : "preview-row", dataset: {line: row.line}},
    h("span", {class: "line-no"}, `Line ${row.line}`),
    row.error ? h("p", {class: "field-error"}, row.error) : null,
    body);
}

function lineError(line, reason, text) {
  return h("li", {class: "line-error", dataset: {line}},
    h("strong", {}, `Line ${line}`), h("span", {class: "line-reason"}, reason),
    text !== undefined && text !== null ? h("pre", {}, text) : null);
}

/** Line errors from `status_details` ("2 invalid line(s): line 2: why; line 3: why"), when no preview has them. */
function errorsFromDetails(details) {
  const found = [];
  const pattern = /line (\d+): (.*?)(?=; line \d+: |; and \d+ more$|$)/g;
  let match;
  while ((match = pattern.exec(details || ""))) found.push({line: Number(match[1]), error: match[2], text: null});
  return found;
}

function errorsSection(file, preview) {
  const rows = preview && Array.isArray(preview.invalid_rows) ? preview.invalid_rows : errorsFromDetails(file.status_details);
  const total = preview && typeof preview.n_errors === "number" ? preview.n_errors : null;
  return h("section", {id: "file-errors", class: "card", "aria-labelledby": "file-errors-title"},
    h("h2", {id: "file-errors-title"}, "Why this file is invalid"),
    h("p", {class: "error-summary"}, file.status_details || "The file could not be validated."),
    total !== null && total > rows.length ? h("p", {class: "meta"}, `Showing ${rows.length} of ${total} invalid lines.`) : null,
    rows.length ? h("ul", {class: "line-errors"}, rows.map((r) => lineError(r.line, r.error, r.text))) : null);
}

function previewSection(preview, previewError) {
  let body;
  if (previewError) {
    body = previewError.status === 404
      ? h("p", {class: "empty"}, "The preview is not available for this file.")
      : errorBox(previewError);
  } else if (!preview.rows || !preview.rows.length) {
    body = h("p", {class: "empty"}, "The file has no lines to show.");
  } else {
    body = [
      h("ol", {class: "preview-rows"}, preview.rows.map(previewRow)),
      preview.truncated ? h("p", {class: "meta"}, `Showing the first ${preview.rows.length} lines.`) : null,
    ];
  }
  return h("section", {id: "file-preview", class: "card", "aria-labelledby": "file-preview-title"},
    h("h2", {id: "file-preview-title"}, "Preview"), body);
}

export default {
  title: "Dataset",
  async render(main, [fileId], ctx) {
    const path = `/v1/files/${encodeURIComponent(fileId)}`;
    let file;
    try {
      file = await api(path, {signal: ctx.signal});
    } catch (err) {
      if (err.status !== 404) throw err;
      replace(main, h("h1", {}, "Dataset"), h("p", {class: "empty"}, `No file found with id ${fileId}.`),
        h("p", {}, h("a", {href: "#/datasets"}, "Back to datasets")));
      return;
    }
    let preview = null;
    let previewError = null;
    try {
      preview = await api(`${path}/preview?limit=${PREVIEW_ROWS}`, {signal: ctx.signal});
    } catch (err) {
      if (ctx.signal.aborted) throw err;
      previewError = err;
    }

    const actionStatus = h("div", {id: "file-action-status"});
    const downloadButton = h("button", {type: "button", class: "secondary", id: "file-download"}, "Download");
    downloadButton.addEventListener("click", async () => {
      replace(actionStatus);
      downloadButton.disabled = true;
      try { await downloadFile(`${path}/content`, {name: file.filename, signal: ctx.signal}); } catch (err) { if (!ctx.signal.aborted) replace(actionStatus, errorBox(err)); }
      downloadButton.disabled = false;
    });
    const deleteButton = h("button", {type: "button", class: "danger", id: "file-delete"}, "Delete");
    deleteButton.addEventListener("click", async () => {
      replace(actionStatus);
      if (!(await confirmAction(`Delete ${file.filename}? This cannot be undone.`, {confirmLabel: "Delete"}))) return;
      try {
        await api(path, {method: "DELETE", signal: ctx.signal});
        ctx.navigate("#/datasets");
      } catch (err) {
        if (!ctx.signal.aborted) replace(actionStatus, errorBox(err));
      }
    });
    const fineTune = file.status === "processed"
      ? h("a", {class: "button", id: "file-fine-tune", href: `#/jobs/new?training_file=${encodeURIComponent(file.id)}`},
        "Fine-tune with this file")
      : null;
    const sha = file.sha256 ? h("code", {title: file.sha256}, `${file.sha256.slice(0, 12)}…`) : "—";

    replace(main,
      h("p", {class: "meta"}, h("a", {href: "#/datasets"}, "Datasets"), " / ", file.id),
      h("div", {class: "page-head"}, h("h1", {class: "file-name"}, file.filename || file.id)),
      h("div", {class: "card"},
        h("div", {class: "stats", id: "file-stats"},
          stat("status", pill(file.status)),
          stat("format", file.format || "—"),
          stat("examples", Number(file.n_examples || 0).toLocaleString()),
          stat("size", formatBytes(file.bytes)),
          stat("sha256", sha),
          stat("created", formatDate(file.created_at))),
        h("div", {class: "actions"}, fineTune, downloadButton, deleteButton),
        actionStatus),
      file.status === "error" ? errorsSection(file, preview) : null,
      previewSection(preview, previewError));
  },
};
