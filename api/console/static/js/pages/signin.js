// Sign-in: paste an API key; it is checked against the API and kept for this browser session only.
import {ApiError, api, clearApiKey, setApiKey} from "../api.js";
import {errorBox, field, h, replace} from "../dom.js";

export default {
  title: "Sign in",
  async render(main, _params, ctx) {
    const key = h("input", {type: "password", name: "api_key", id: "api-key", autocomplete: "off", required: true,
      spellcheck: "false", placeholder: "pb-…"});
    const status = h("div", {id: "signin-status"});
    const form = h("form", {class: "card narrow", id: "signin-form"},
      h("h1", {}, "Sign in"),
      h("p", {}, "Paste your team's API key. It stays in this browser tab only, until you sign out or close it."),
      field("API key", key),
      status,
      h("div", {class: "actions"}, h("button", {type: "submit"}, "Sign in")));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      replace(status);
      clearApiKey();
      setApiKey(key.value.trim());
      try {
        const me = await api("/v1/me");
        sessionStorage.setItem("patchbay.identity", JSON.stringify(me));
        ctx.navigate("#/datasets");
      } catch (err) {
        clearApiKey();
        replace(status, errorBox(err instanceof ApiError ? err : String(err)));
      }
    });
    replace(main, form);
    key.focus();
  },
};
