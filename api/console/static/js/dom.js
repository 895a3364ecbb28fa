// Small DOM helpers: elements are built with h(), never from HTML strings, so API data cannot inject markup.

/** h("div", {class: "x", onclick: fn}, child, ...) builds an element; strings become text nodes. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A labelled form control: <label for=id>text</label> control [hint] [error slot]. */
export function field(label, control, {hint, wide} = {}) {
  if (!control.id) control.id = `f-${Math.random().toString(36).slice(2, 9)}`;
  const error = h("p", {class: "field-error", id: `${control.id}-error`, role: "alert"});
  control.setAttribute("aria-describedby", `${control.id}-error`);
  return h("div", {class: wide ? "field wide" : "field", dataset: {field: control.name || ""}},
    h("label", {for: control.id}, label), control, hint ? h("p", {class: "hint"}, hint) : null, error);
}

/** A table: columns are [header, cell(row)] pairs. */
export function table(columns, rows, {empty = "Nothing here yet.", caption} = {}) {
  if (!rows.length) return h("p", {class: "empty"}, empty);
  return h("div", {class: "table-wrap"}, h("table", {},
    caption ? h("caption", {}, caption) : null,
    h("thead", {}, h("tr", {}, columns.map(([name]) => h("th", {scope: "col"}, name)))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map(([name, cell]) =>
      h("td", {"data-label": name}, cell(row))))))));
}

/** A status pill. */
export function pill(text) {
  return h("span", {class: `pill pill-${String(text).replace(/[^a-z_]/gi, "")}`}, text);
}

export function formatBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n >= 10 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

export function formatDate(seconds) {
  if (!seconds) return "—";
  return new Date(seconds * 1000).toLocaleString(undefined, {dateStyle: "medium", timeStyle: "short"});
}

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

export function formatNumber(n, digits = 4) {
  if (n === null || n === undefined) return "—";
  return Number(n).toPrecision(digits).replace(/\.?0+$/, "");
}

/** Briefly announce something in the status region. */
export function toast(message) {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.classList.add("shown");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => el.classList.remove("shown"), 4000);
}

/** An error box showing the API's error object (message, code, param). */
export function errorBox(err) {
  const e = err && err.error ? err.error : {message: String(err && err.message ? err.message : err)};
  return h("div", {class: "error-box", role: "alert"},
    h("strong", {}, e.message),
    e.code || e.param ? h("p", {class: "meta"}, [e.code ? `code: ${e.code}` : null, e.param ? ` param: ${e.param}` : null]) : null);
}

/** Ask before something that cannot be undone; resolves true or false. Uses a real <dialog>. */
export function confirmAction(message, {confirmLabel = "Confirm"} = {}) {
  return new Promise((resolve) => {
    const dialog = h("dialog", {class: "confirm", "aria-label": "Confirm"},
      h("p", {}, message),
      h("div", {class: "actions"},
        h("button", {type: "button", class: "secondary", onclick: () => dialog.close("cancel")}, "Cancel"),
        h("button", {type: "button", class: "danger", onclick: () => dialog.close("ok")}, confirmLabel)));
    dialog.addEventListener("close", () => { dialog.remove(); resolve(dialog.returnValue === "ok"); });
    document.body.append(dialog);
    dialog.showModal();
  });
}
