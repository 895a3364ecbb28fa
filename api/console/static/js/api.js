// The console's only way to the API: the public /v1 routes with the signed-in key as a Bearer token.

const KEY = "patchbay.apiKey";

/** The key of this browser session (sessionStorage: gone when the tab closes). */
export function apiKey() { return sessionStorage.getItem(KEY); }
export function setApiKey(key) { sessionStorage.setItem(KEY, key); }
export function clearApiKey() { sessionStorage.removeItem(KEY); sessionStorage.removeItem("patchbay.identity"); }

/** A failed API call: `error` is the API's error object ({message, type, param, code, errors?}). */
export class ApiError extends Error {
  constructor(status, body) {
    const error = body && body.error ? body.error : {message: `HTTP ${status}`, type: "api_error"};
    super(error.message);
    this.status = status;
    this.error = error;
  }

  /** Every problem as {param, message}: the error's own list when it has one, else the error itself. */
  get problems() {
    if (Array.isArray(this.error.errors) && this.error.errors.length) return this.error.errors;
    return [{param: this.error.param, message: this.error.message, code: this.error.code}];
  }
}

function headers(extra = {}) {
  const out = {...extra};
  const key = apiKey();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function failure(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  if (response.status === 401 && apiKey()) window.dispatchEvent(new CustomEvent("patchbay:unauthorized"));
  return new ApiError(response.status, body);
}

/** Call the API: api("/v1/files"), api(path, {method: "POST", json: {...}}). Resolves the JSON body. */
export async function api(path, {method = "GET", json, body, signal, raw = false} = {}) {
  const init = {method, signal, headers: headers(json !== undefined ? {"Content-Type": "application/json"} : {})};
  if (json !== undefined) init.body = JSON.stringify(json);
  else if (body !== undefined) init.body = body;
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

/** Every item of a paged list (`after` cursors), up to `max` items. */
export async function listAll(path, {signal, max = 1000} = {}) {
  const items = [];
  let after = null;
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(after ? `${path}${sep}after=${encodeURIComponent(after)}` : path, {signal});
    items.push(...page.data);
    if (!page.has_more || !page.data.length || items.length >= max) return items;
    after = page.data[page.data.length - 1].id;
  }
}

/**
 * Server-Sent Events over fetch (EventSource cannot send the Authorization header).
 * Yields each event's parsed JSON data; ends at `[DONE]` or when the stream closes.
 */
export async function* streamEvents(path, {method = "GET", json, signal} = {}) {
  const init = {method, signal, headers: headers({Accept: "text/event-stream"})};
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;  // a comment or keep-alive ping
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

/** Upload a multipart form with progress (fetch has no upload progress; XMLHttpRequest does). */
export function uploadForm(path, form, {onProgress, signal} = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    const key = apiKey();
    if (key) xhr.setRequestHeader("Authorization", `Bearer ${key}`);
    xhr.responseType = "json";
    xhr.upload.onprogress = (e) => { if (e.lengthComputable && onProgress) onProgress(e.loaded / e.total); };
    xhr.onload = () => (xhr.status >= 200 && xhr.status < 300 ? resolve(xhr.response) : reject(new ApiError(xhr.status, xhr.response)));
    xhr.onerror = () => reject(new ApiError(0, {error: {message: "The upload failed: the connection was lost.", type: "api_error"}}));
    if (signal) signal.addEventListener("abort", () => xhr.abort());
    xhr.send(form);
  });
}

/** Download an API resource with the key; the browser saves it as `name`, else under the server's filename. */
export async function downloadFile(path, {name, signal} = {}) {
  const response = await api(path, {raw: true, signal});
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = name || (match ? decodeURIComponent(match[1]) : "download");
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
