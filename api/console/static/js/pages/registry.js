// Adapter registry: the team's adapter versions grouped by name, with downloads and deletes, the aliases of
// each name (promote / roll back, with their history), and importing a PEFT adapter trained elsewhere.
import {api, downloadFile, listAll, uploadForm} from "../api.js";
import {confirmAction, errorBox, field, formatBytes, formatDate, formatNumber, h, replace, table, toast} from "../dom.js";

const ALIAS_PATTERN = /^[A-Za-z0-9._-]{1,64}$/;
const NAME_PATTERN = /^[A-Za-z0-9._-]{1,128}$/;

/** 12345 -> "12.3 K", for parameter counts. */
function compactCount(n) {
  if (n === null || n === undefined) return "?";
  return new Intl.NumberFormat(undefined, {notation: "compact", maximumSignificantDigits: 3}).format(n);
}

function shareText(a) {
  if (a.trainable_share === null || a.trainable_share === undefined) return `${compactCount(a.trainable_params)} params`;
  const percent = a.trainable_share * 100;
  return `${percent >= 1 ? percent.toFixed(1) : percent.toPrecision(2)} % (${compactCount(a.trainable_params)} of ${compactCount(a.base_params)})`;
}

/** Show an API error's problems beside the fields they name in `form`; the rest go to `status`. */
function showProblems(form, status, err) {
  const unplaced = [];
  for (const problem of err.problems || []) {
    const slot = problem.param && form.querySelector(`[data-field="${CSS.escape(problem.param)}"]`);
    if (!slot) { unplaced.push(problem); continue; }
    slot.classList.add("invalid");
    slot.querySelector(".field-error").textContent = problem.code ? `${problem.message} (${problem.code})` : problem.message;
  }
  replace(status, unplaced.length || !err.problems ? errorBox(err) : null);
}

function clearProblems(form, status) {
  for (const slot of form.querySelectorAll(".field.invalid")) slot.classList.remove("invalid");
  for (const slot of form.querySelectorAll(".field-error")) slot.textContent = "";
  replace(status);
}

export default {
  title: "Adapter registry",
  async render(main, _params, ctx) {
    const {signal} = ctx;
    const status = h("div", {id: "registry-status"});
    const groups = h("div", {id: "adapter-groups"}, h("p", {class: "meta"}, "Loading…"));
    const importForm = buildImportForm();
    const toImport = h("button", {type: "button", class: "secondary", id: "go-import", onclick: () => {
      importForm.form.scrollIntoView({block: "start"});
      importForm.form.querySelector("#import-file").focus({preventScroll: true});
    }}, "Import an adapter");
    replace(main, h("div", {class: "page-head"}, h("h1", {}, "Adapter registry"), toImport), status, groups,
      h("section", {class: "card"}, h("h2", {}, "Import an adapter"), importForm.form));

    /** Run an action of a button: disable it meanwhile, show its error, reload the registry after. */
    async function run(button, work) {
      button.disabled = true;
      replace(status);
      try {
        await work();
      } catch (err) {
        if (signal.aborted) return;
        replace(status, errorBox(err));
        status.scrollIntoView({block: "nearest"});
      } finally {
        button.disabled = false;
      }
    }

    async function moveAlias(name, alias, version) {
      await api(`/v1/adapters/${encodeURIComponent(name)}/aliases`, {method: "POST", json: {alias, version}, signal});
      toast(`${name}:${alias} now points at version ${version}.`);
      await load();
    }

    function versionsTable(name, versions) {
      const button = (text, cls, label, onclick, key) => h("button", {type: "button", class: cls, "aria-label": label,
        dataset: {key}, onclick}, text);
      return table([
        ["Version", (a) => h("span", {class: "nowrap"}, `v${a.version}`,
          a.aliases.map((alias) => h("span", {class: "alias-chip"}, alias)))],
        ["Method", (a) => h("span", {class: "nowrap"}, [a.method, a.rank ? ` · r ${a.rank}` : "",
          Object.keys(a.techniques || {}).length ? ` · ${Object.keys(a.techniques).join(", ")}` : ""].join(""))],
        ["Trainable", shareText],
        ["Size", (a) => h("span", {class: "nowrap"}, formatBytes(a.bytes))],
        ["Validation loss", (a) => formatNumber(a.metrics && a.metrics.valid_loss)],
        ["Source", (a) => (a.job_id ? h("a", {href: `#/jobs/${encodeURIComponent(a.job_id)}`}, a.job_id) : a.source)],
        ["Created", (a) => formatDate(a.created_at)],
        ["Actions", (a) => h("div", {class: "row-actions"},
          button("Download", "secondary download", `Download ${name} v${a.version}`, (event) => run(event.currentTarget, async () => {
            await downloadFile(`/v1/adapters/${encodeURIComponent(a.id)}/download`, {signal});
          }), `download:${a.id}`),
          button("Delete", "danger delete", `Delete ${name} v${a.version}`, (event) => run(event.currentTarget, async () => {
            const sure = await confirmAction(`Delete ${name} version ${a.version}? Its stored files go, and so do the `
              + "aliases that point at it. This cannot be undone.", {confirmLabel: "Delete"});
            if (!sure) return;
            await api(`/v1/adapters/${encodeURIComponent(a.id)}`, {method: "DELETE", signal});
            toast(`Deleted ${name} version ${a.version}.`);
            await load();
          }), `delete:${a.id}`))],
      ], versions, {caption: "Versions"});
    }

    function describeMove(move, byId) {
      const label = (id) => (byId.has(id) ? `v${byId.get(id).version}` : "a deleted version");
      if (!move.adapter_id) return "removed: the version it pointed at was deleted";
      if (!move.previous_adapter_id) return `set to ${label(move.adapter_id)}`;
      return `moved from ${label(move.previous_adapter_id)} to ${label(move.adapter_id)}`;
    }

    function aliasList(name, versions, history) {
      const byId = new Map(versions.map((a) => [a.id, a]));
      const current = new Map();
      for (const a of versions) for (const alias of a.aliases) current.set(alias, a);
      const names = [...new Set([...current.keys(), ...history.map((m) => m.alias)])].sort();
      if (!names.length) return h("p", {class: "empty"}, "No aliases yet: point one (say, prod) at a version below.");
      return h("ul", {class: "alias-list"}, names.map((alias) => {
        const target = current.get(alias);
        const moves = history.filter((m) => m.alias === alias);  // newest first
        const previous = target && moves[0] && moves[0].adapter_id === target.id ? byId.get(moves[0].previous_adapter_id) : null;
        const rollBack = previous && previous.id !== target.id
          ? h("button", {type: "button", class: "secondary rollback", dataset: {key: `rollback:${name}:${alias}`},
            "aria-label": `Roll back ${name}:${alias} to v${previous.version}`,
            onclick: (event) => run(event.currentTarget, async () => {
              const sure = await confirmAction(`Point ${name}:${alias} back at version ${previous.version}?`,
                {confirmLabel: "Roll back"});
              if (sure) await moveAlias(name, alias, previous.version);
            })}, `Roll back to v${previous.version}`)
          : null;
        return h("li", {dataset: {alias}},
          h("div", {class: "alias-head"}, h("code", {}, `${name}:${alias}`), " → ",
            target ? h("strong", {}, `v${target.version}`) : h("span", {class: "meta"}, "not set"), rollBack),
          moves.length ? h("details", {}, h("summary", {}, `History (${moves.length})`),
            h("ol", {class: "alias-history"}, moves.map((m) => h("li", {},
              h("time", {datetime: new Date(m.created_at * 1000).toISOString()}, formatDate(m.created_at)), ": ",
              describeMove(m, byId))))) : null);
      }));
    }

    function aliasForm(name, versions) {
      const version = h("select", {name: "version"}, versions.map((a) => h("option", {value: a.version}, `v${a.version}`)));
      const alias = h("input", {name: "alias", required: true, maxlength: 64, placeholder: "prod", autocomplete: "off"});
      const formStatus = h("div", {class: "form-status"});
      const form = h("form", {class: "alias-form", "aria-label": `Move an alias of ${name}`},
        h("div", {class: "fields"}, field("Version", version), field("Alias", alias, {hint: "e.g. prod or staging"})),
        formStatus,
        h("div", {class: "actions"}, h("button", {type: "submit", class: "promote", dataset: {key: `promote:${name}`}}, "Move alias")));
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        clearProblems(form, formStatus);
        const aliasName = alias.value.trim();
        const target = Number(version.value);
        if (!ALIAS_PATTERN.test(aliasName)) {
          showProblems(form, formStatus, {problems: [{param: "alias", message: "Use 1-64 letters, digits, '.', '_' or '-'."}]});
          return;
        }
        if (!(await confirmAction(`Point ${name}:${aliasName} at version ${target}?`, {confirmLabel: "Move alias"}))) return;
        const submit = form.querySelector("button.promote");
        submit.disabled = true;
        try {
          await moveAlias(name, aliasName, target);
        } catch (err) {
          if (!signal.aborted) showProblems(form, formStatus, err);
        } finally {
          submit.disabled = false;
        }
      });
      return form;
    }

    function group(name, versions, history, historyError) {
      const bases = [...new Set(versions.map((a) => a.base_model))].join(", ");
      return h("section", {class: "card adapter-group", dataset: {name}},
        h("h2", {}, name),
        h("p", {class: "meta"}, `${versions.length} version${versions.length === 1 ? "" : "s"} · base model ${bases}`),
        versionsTable(name, versions),
        h("h3", {}, "Aliases"),
        historyError ? errorBox(historyError) : aliasList(name, versions, history),
        aliasForm(name, versions));
    }

    /** Fetch every adapter and each name's alias history, and draw the groups. */
    async function load() {
      const adapters = await listAll("/v1/adapters?limit=100", {signal, max: 2000});
      const byName = new Map();
      for (const a of adapters) {
        if (!byName.has(a.name)) byName.set(a.name, []);
        byName.get(a.name).push(a);
      }
      const sections = await Promise.all([...byName].map(async ([name, versions]) => {
        versions.sort((x, y) => y.version - x.version);
        try {
          const history = await api(`/v1/adapters/${encodeURIComponent(name)}/aliases`, {signal});
          return group(name, versions, history.data, null);
        } catch (err) {
          if (signal.aborted) throw err;
          return group(name, versions, [], err);
        }
      }));
      if (signal.aborted) return;
      const focusKey = groups.contains(document.activeElement) ? document.activeElement.dataset.key : null;
      replace(groups, sections.length ? sections : h("p", {class: "empty", id: "registry-empty"},
        "No adapters yet. They appear here when a fine-tuning job succeeds (",
        h("a", {href: "#/jobs/new"}, "start one"), "), or import one trained elsewhere below."));
      importForm.names(byName.keys());
      if (focusKey) groups.querySelector(`[data-key="${CSS.escape(focusKey)}"]`)?.focus();
    }

    function buildImportForm() {
      const file = h("input", {type: "file", id: "import-file", name: "file", required: true,
        accept: ".tar.gz,.tgz,.zip,application/gzip,application/zip"});
      const name = h("input", {name: "name", id: "import-name", required: true, maxlength: 128, autocomplete: "off",
        placeholder: "support-bot", list: "adapter-names"});
      const namesList = h("datalist", {id: "adapter-names"});
      const baseModel = h("select", {name: "base_model", id: "import-base-model", required: true},
        h("option", {value: ""}, "Loading…"));
      const progress = h("progress", {id: "import-progress", max: 1, value: 0, hidden: true, "aria-label": "Upload progress"});
      const formStatus = h("div", {class: "form-status", id: "import-status"});
      const submit = h("button", {type: "submit"}, "Import adapter");
      const form = h("form", {id: "import-form"},
        h("p", {class: "meta"}, "A tar.gz or zip of a PEFT LoRA folder (adapter_config.json and adapter_model.safetensors). "
          + "It is checked completely before it is stored; an existing name gets a new version."),
        h("div", {class: "fields"},
          field("PEFT archive", file, {wide: true}),
          field("Name", name, {hint: "Letters, digits, '.', '_' and '-'."}),
          field("Base model", baseModel, {hint: "The model the adapter was trained on."})),
        namesList, progress, formStatus, h("div", {class: "actions"}, submit));

      api("/v1/models", {signal}).then((page) => {
        const bases = page.data.filter((m) => !m.parent);
        replace(baseModel, bases.length ? bases.map((m) => h("option", {value: m.id}, m.id))
          : h("option", {value: ""}, "No base models registered"));
        submit.disabled = !bases.length;
      }, (err) => {
        if (!signal.aborted) replace(formStatus, errorBox(err));
      });

      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        clearProblems(form, formStatus);
        if (!NAME_PATTERN.test(name.value.trim())) {  // checked here so a big archive is not sent in vain
          showProblems(form, formStatus, {problems: [{param: "name", message: "Use 1-128 letters, digits, '.', '_' or '-'."}]});
          return;
        }
        name.value = name.value.trim();
        submit.disabled = true;
        progress.hidden = false;
        progress.value = 0;
        try {
          const adapter = await uploadForm("/v1/adapters/import", new FormData(form),
            {signal, onProgress: (share) => { progress.value = share; }});
          toast(`Imported ${adapter.name} version ${adapter.version}.`);
          form.reset();
          await load();
        } catch (err) {
          if (!signal.aborted) showProblems(form, formStatus, err);
        } finally {
          submit.disabled = false;
          progress.hidden = true;
        }
      });
      return {form, names: (all) => replace(namesList, [...all].map((n) => h("option", {value: n})))};
    }

    try {
      await load();
    } catch (err) {
      if (signal.aborted) return;
      replace(groups, errorBox(err));
    }
  },
};
