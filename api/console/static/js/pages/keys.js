// API keys (admin): the team's keys by prefix, revoke one, and issue a new one whose secret is shown once.
import {api, clearApiKey} from "../api.js";
import {confirmAction, errorBox, formatDate, h, replace, table, toast} from "../dom.js";

/** Copy the secret; where the clipboard is unavailable (plain http, permission refused), select it instead. */
async function copySecret(code) {
  try {
    if (!navigator.clipboard || !window.isSecureContext) throw new Error("no clipboard");
    await navigator.clipboard.writeText(code.textContent);
    toast("Key copied to the clipboard.");
  } catch {
    const range = document.createRange();
    range.selectNodeContents(code);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    toast("Copying is not available here: the key is selected, press Ctrl+C (⌘C) to copy it.");
  }
}

/** The one-time view of a new key's secret. */
function secretView(created) {
  const code = h("code", {id: "new-key-secret"}, created.key);
  return h("div", {class: "card", id: "new-key"},
    h("h2", {}, `New ${created.is_admin ? "admin " : ""}key ${created.prefix}…`),
    h("div", {class: "secret"}, code,
      h("button", {type: "button", class: "secondary", onclick: () => copySecret(code)}, "Copy")),
    h("p", {class: "hint"}, "Store it now: this secret is never shown again."));
}

export default {
  title: "API keys",
  admin: true,
  async render(main, _params, ctx) {
    const myKeyId = ctx.identity.key.id;
    const tableSlot = h("div", {id: "keys-table"});
    const status = h("div", {id: "keys-status"});
    const newKey = h("div", {id: "new-key-slot"});
    const count = h("span", {class: "meta"});

    /** Reload the team's keys into the table. */
    async function load() {
      const page = await api("/v1/api_keys", {signal: ctx.signal});
      replace(tableSlot, table([
        ["Prefix", (k) => h("code", {}, `${k.prefix}…`)],
        ["Created", (k) => formatDate(k.created_at)],
        ["Admin", (k) => (k.is_admin ? "admin" : "—")],
        ["Signed in", (k) => (k.id === myKeyId ? h("strong", {class: "this-key"}, "this key") : "")],
        ["Actions", (k) => h("button", {type: "button", class: "danger revoke", dataset: {keyId: k.id},
          "aria-label": `Revoke key ${k.prefix}`, onclick: () => revoke(k)}, "Revoke")],
      ], page.data, {empty: "This team has no keys."}));
      replace(count, `${page.data.length} key${page.data.length === 1 ? "" : "s"}`);
    }

    async function revoke(key) {
      const mine = key.id === myKeyId;
      const ok = await confirmAction(
        `Revoke key ${key.prefix}…? Anything using it stops working at once.${mine ? " It is the key you are signed in with: you will be signed out." : ""}`,
        {confirmLabel: "Revoke"});
      if (!ok) return;
      replace(status);
      try {
        await api(`/v1/api_keys/${encodeURIComponent(key.id)}`, {method: "DELETE", signal: ctx.signal});
      } catch (err) {
        if (err.name !== "AbortError") replace(status, errorBox(err));
        return;
      }
      if (mine) {
        clearApiKey();
        ctx.navigate("#/signin");
        return;
      }
      toast(`Key ${key.prefix}… revoked.`);
      await load().catch((err) => replace(status, errorBox(err)));
    }

    const admin = h("input", {type: "checkbox", name: "admin", id: "new-key-admin"});
    const form = h("form", {id: "create-key-form", class: "card"},
      h("h2", {}, "Create a key"),
      h("div", {class: "check"}, admin, h("label", {for: admin.id}, "Admin key")),
      h("p", {class: "hint"}, "An admin key can also manage keys, the fleet view and adapters at runtime."),
      h("div", {class: "actions"}, h("button", {type: "submit"}, "Create key")));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      replace(status);
      try {
        const created = await api("/v1/api_keys", {method: "POST", json: {admin: admin.checked}, signal: ctx.signal});
        replace(newKey, secretView(created));
        admin.checked = false;
        await load();
      } catch (err) {
        if (err.name !== "AbortError") replace(status, errorBox(err));
      } finally {
        button.disabled = false;
      }
    });

    replace(main, h("div", {class: "page-head"}, h("h1", {}, "API keys")), status, form, newKey,
      h("h2", {}, "Team keys ", count), tableSlot);
    try {
      await load();
    } catch (err) {
      if (err.name === "AbortError") throw err;
      replace(tableSlot, errorBox(err));
    }
  },
};
