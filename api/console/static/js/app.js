// The console shell: sign-in gate, hash routes, navigation, and each page's lifetime (aborted on leaving).
import {api, apiKey, clearApiKey} from "./api.js";
import {errorBox, h, replace} from "./dom.js";

const ROUTES = [
  [/^#\/signin$/, "signin"],
  [/^#\/datasets$/, "datasets"],
  [/^#\/files\/([\w.-]+)$/, "file"],
  [/^#\/jobs\/new$/, "new_job"],
  [/^#\/jobs$/, "jobs"],
  [/^#\/jobs\/([\w.-]+)$/, "job"],
  [/^#\/registry$/, "registry"],
  [/^#\/playground$/, "playground"],
  [/^#\/fleet$/, "fleet"],
  [/^#\/keys$/, "keys"],
];
const HOME = "#/datasets";
const main = document.getElementById("main");
let current = null;  // {controller} of the page on screen

/** Who the signed-in key is: {team: {id, name}, key: {id, prefix, is_admin}} (cached for the session). */
export async function identity() {
  const cached = sessionStorage.getItem("patchbay.identity");
  if (cached) return JSON.parse(cached);
  const me = await api("/v1/me");
  sessionStorage.setItem("patchbay.identity", JSON.stringify(me));
  return me;
}

/** The page of a hash like `#/jobs/new?training_file=file-1`: {name, params, query}. */
function route(hash) {
  const [path, search = ""] = hash.split("?", 2);
  for (const [pattern, name] of ROUTES) {
    const match = pattern.exec(path);
    if (match) return {name, params: match.slice(1).map(decodeURIComponent), query: new URLSearchParams(search)};
  }
  return null;
}

function showChrome(me) {
  document.getElementById("nav").hidden = !me;
  document.getElementById("identity").hidden = !me;
  document.getElementById("team-name").textContent = me ? `${me.team.name}${me.key.is_admin ? " (admin)" : ""}` : "";
  for (const link of document.querySelectorAll("[data-admin]")) link.hidden = !(me && me.key.is_admin);
}

function markCurrent(name) {
  for (const link of document.querySelectorAll("#nav a")) {
    const here = link.dataset.page === name.replace("_", "-") || (name === "file" && link.dataset.page === "datasets")
      || (name === "job" && link.dataset.page === "jobs");
    if (here) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
}

async function render() {
  delete main.dataset.ready;
  document.getElementById("toast").classList.remove("shown");  // a message belongs to the page it came from
  if (current) current.controller.abort();
  const controller = new AbortController();
  current = {controller};
  const signal = controller.signal;
  let target = route(location.hash) || route(HOME);
  if (!apiKey() && target.name !== "signin") {
    location.replace("#/signin");
    return;
  }
  let me = null;
  if (apiKey()) {
    try { me = await identity(); } catch (err) {
      clearApiKey();
      showChrome(null);
      location.replace("#/signin");
      return;
    }
  }
  if (signal.aborted) return;
  showChrome(me);
  markCurrent(target.name);
  main.dataset.page = target.name;
  const ctx = {
    signal,
    identity: me,
    query: target.query,
    navigate: (hash) => { location.hash = hash; },
    /** Run fn now and every `ms` until the page is left (never two at once). */
    every(ms, fn) {
      let busy = false;
      const tick = async () => {
        if (busy || signal.aborted) return;
        busy = true;
        try { await fn(); } catch (err) { if (!signal.aborted) console.warn(err); } finally { busy = false; }
      };
      const timer = setInterval(tick, ms);
      signal.addEventListener("abort", () => clearInterval(timer));
      return tick();
    },
  };
  try {
    const page = (await import(`./pages/${target.name}.js`)).default;
    if (signal.aborted) return;
    document.title = `${page.title} · Patchbay`;
    if (page.admin && !(me && me.key.is_admin)) {
      replace(main, h("h1", {}, page.title), h("p", {class: "empty"}, "This page needs an admin key."));
    } else {
      replace(main);
      await page.render(main, target.params, ctx);
    }
  } catch (err) {
    if (signal.aborted || (err && err.name === "AbortError")) return;
    replace(main, errorBox(err));
  }
  if (!signal.aborted) main.dataset.ready = "1";
}

document.getElementById("sign-out").addEventListener("click", () => {
  clearApiKey();
  showChrome(null);
  location.hash = "#/signin";
});
window.addEventListener("patchbay:unauthorized", () => {
  clearApiKey();
  showChrome(null);
  location.hash = "#/signin";
});
window.addEventListener("hashchange", render);
// Keyboard users land on the page's content after following a link.
window.addEventListener("hashchange", () => main.focus({preventScroll: true}));
render();
