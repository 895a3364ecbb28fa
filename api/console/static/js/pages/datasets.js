// Datasets: upload JSONL files (drag and drop or the file picker, one after another) and list the team's files.
import {listAll, uploadForm} from "../api.js";
import {errorBox, formatBytes, formatDate, h, pill, replace, table} from "../dom.js";

/** A count with digit grouping, or "—" when the object has none. */
const count = (n) => (n === undefined || n === null ? "—" : Number(n).toLocaleString());

const FILE_COLUMNS = [
  ["Filename", (f) => h("a", {href: `#/files/${encodeURIComponent(f.id)}`}, f.filename || f.id)],
  ["Status", (f) => pill(f.status)],
  ["Format", (f) => f.format || "—"],
  ["Examples", (f) => count(f.n_examples)],
  ["Tokens", (f) => count(f.n_tokens)],
  ["Size", (f) => formatBytes(f.bytes)],
  ["Created", (f) => formatDate(f.created_at)],
];

/** What one finished upload says: a link to the file, its status, and where its line errors are. */
function uploadResult(file) {
  const link = h("a", {href: `#/files/${encodeURIComponent(file.id)}`}, file.filename || file.id);
  if (file.status === "error") {
    return h("li", {class: "upload-result", dataset: {status: file.status}},
      link, " ", pill(file.status), " ",
      h("span", {class: "upload-invalid"}, "The file is invalid: ",
        h("a", {href: `#/files/${encodeURIComponent(file.id)}`}, "see its line errors"),
        file.status_details ? ` (${file.status_details.slice(0, 200)}${file.status_details.length > 200 ? "…" : ""})` : ""));
  }
  return h("li", {class: "upload-result", dataset: {status: file.status}},
    link, " ", pill(file.status), " ", h("span", {class: "meta"}, `${count(file.n_examples)} examples, ${file.format || "unknown format"}`));
}

export default {
  title: "Datasets",
  async render(main, _params, ctx) {
    const input = h("input", {type: "file", id: "file-input", name: "file", multiple: true,
      accept: ".jsonl,.json,application/jsonl"});
    const dropzone = h("div", {id: "dropzone", class: "dropzone"},
      h("p", {}, "Drop JSONL files here, or pick them:"),
      h("label", {for: "file-input", class: "dropzone-label"}, "Choose a JSONL file"),
      input,
      h("p", {class: "hint"}, "One example per line: chat (messages), prompt/completion, alpaca (instruction/output) or text."));
    const progress = h("progress", {id: "upload-progress", max: 100, value: 0, "aria-label": "Upload progress"});
    const progressText = h("span", {id: "upload-progress-text", class: "meta", "aria-live": "polite"});
    const progressBox = h("div", {class: "upload-progress", hidden: true}, progressText, progress);
    const results = h("ul", {id: "upload-results", class: "upload-results", "aria-live": "polite"});
    const listBox = h("div", {id: "files-table"}, h("p", {class: "empty"}, "Loading files…"));
    const queue = [];
    let uploading = false;

    async function refreshList() {
      try {
        const files = await listAll("/v1/files", {signal: ctx.signal, max: 500});
        replace(listBox, table(FILE_COLUMNS, files, {empty: "No files yet: upload a JSONL file above."}));
      } catch (err) {
        if (!ctx.signal.aborted) replace(listBox, errorBox(err));
      }
    }

    /** Upload the queued files one after another, showing each one's progress and result. */
    async function drain() {
      if (uploading) return;
      uploading = true;
      progressBox.hidden = false;
      let done = 0;
      while (queue.length && !ctx.signal.aborted) {
        const file = queue.shift();
        const position = `${done + 1} of ${done + 1 + queue.length}`;
        const show = (fraction) => {
          const percent = Math.round(fraction * 100);
          progress.value = percent;
          progressText.textContent = `Uploading ${file.name} (${position}): ${percent}%`;
        };
        show(0);
        const form = new FormData();
        form.append("purpose", "fine-tune");
        form.append("file", file, file.name);
        try {
          const uploaded = await uploadForm("/v1/files", form, {signal: ctx.signal, onProgress: show});
          show(1);
          results.prepend(uploadResult(uploaded));
        } catch (err) {
          if (ctx.signal.aborted) return;
          results.prepend(h("li", {class: "upload-result", dataset: {status: "failed"}},
            h("span", {}, file.name), errorBox(err)));
        }
        done += 1;
        await refreshList();
      }
      uploading = false;
      progressBox.hidden = true;
    }

    function enqueue(files) {
      queue.push(...files);
      drain();
    }

    input.addEventListener("change", () => {
      enqueue([...input.files]);
      input.value = "";
    });
    const opts = {signal: ctx.signal};
    for (const name of ["dragenter", "dragover"]) {
      dropzone.addEventListener(name, (e) => { e.preventDefault(); dropzone.classList.add("over"); }, opts);
    }
    dropzone.addEventListener("dragleave", (e) => {
      if (!dropzone.contains(e.relatedTarget)) dropzone.classList.remove("over");
    }, opts);
    dropzone.addEventListener("drop", (e) => {
      e.preventDefault();
      dropzone.classList.remove("over");
      enqueue([...(e.dataTransfer ? e.dataTransfer.files : [])]);
    }, opts);
    // A file dropped beside the zone would make the browser open it and leave the console.
    window.addEventListener("dragover", (e) => e.preventDefault(), opts);
    window.addEventListener("drop", (e) => e.preventDefault(), opts);

    replace(main,
      h("div", {class: "page-head"}, h("h1", {}, "Datasets")),
      h("section", {class: "card", "aria-labelledby": "upload-title"},
        h("h2", {id: "upload-title"}, "Upload"), dropzone, progressBox, results),
      h("section", {"aria-labelledby": "files-title"}, h("h2", {id: "files-title"}, "Files"), listBox));
    await refreshList();
  },
};
