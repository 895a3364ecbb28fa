// New fine-tuning job: a form built from the API's own OpenAPI schemas, previewed with `dry_run=true`.
//
// Every control's `name` is the API parameter path it sets (`peft.adalora.init_r`), so each problem of a
// 400 lands beside its field. Only what the user set is sent: the API applies (and the preview shows) the rest.
import {api, listAll} from "../api.js";
import {errorBox, field, h, replace} from "../dom.js";
import {describe, shown, hintText, kindOf, valueOf, setPath, getPath} from "../schema_fields.js";

// Which methods use which parameters (mirrors core/schemas/peft_methods.py and core/schemas/training.py).
const LORA_FAMILY = ["qlora", "lora", "dora", "adalora"];
const WEIGHT_DELTA_METHODS = ["loha", "lokr", "hra"];
const PROMPT_LEARNING = ["prefix_tuning", "prompt_tuning", "p_tuning"];
const RANKED_METHODS = [...LORA_FAMILY, ...WEIGHT_DELTA_METHODS];
const RANKED_FIELDS = ["r", "alpha", "dropout", "target_modules"];
const METHOD_OBJECTS = {
  adalora: {methods: ["adalora"], schema: "AdaLoraSpec", legend: "AdaLoRA budget schedule"},
  ia3: {methods: ["ia3"], schema: "Ia3Spec", legend: "IA3 modules"},
  prompt: {methods: PROMPT_LEARNING, schema: "PromptSpec", legend: "Virtual tokens"},
  bottleneck: {methods: ["bottleneck_adapter"], schema: "BottleneckSpec", legend: "Bottleneck adapters"},
};
const PROMPT_OWNERS = {init_text: ["prompt_tuning"], encoder: ["p_tuning"],
  encoder_hidden_size: ["p_tuning", "prefix_tuning"], prefix_projection: ["prefix_tuning"]};
const SPARSE_TOP_K_ONLY = ["density", "warmup_steps"];
const TECHNIQUE_FIELDS = ["layer_drop", "layerwise_lr_decay"];
const METHOD_FIELDS = ["method", ...RANKED_FIELDS, "quantization"];
const LABELS = {
  suffix: "Suffix", seed: "Seed", n_epochs: "Epochs", batch_size: "Batch size",
  learning_rate_multiplier: "Learning rate multiplier", method: "Method", r: "Rank (r)", alpha: "Alpha",
  dropout: "Dropout", target_modules: "Target modules", quantization: "Quantization", learning_rate: "Learning rate",
  lr_scheduler: "LR scheduler", warmup_ratio: "Warmup ratio", weight_decay: "Weight decay", packing: "Packing",
  train_on_inputs: "Train on inputs", gradient_checkpointing: "Gradient checkpointing",
  max_seq_length: "Max sequence length", max_steps: "Max steps", eval_every_steps: "Evaluate every (steps)",
  checkpoint_every_steps: "Checkpoint every (steps)", layer_drop: "Layer drop", layerwise_lr_decay: "Layer-wise LR decay",
  kind: "Sparse fine-tuning", warmup_steps: "Warmup steps",
};
const humanize = (key) => key.charAt(0).toUpperCase() + key.slice(1).replace(/_/g, " ");
const DRY_RUN_DELAY_MS = 400;

const isHidden = (el) => Boolean(el.closest("[hidden]"));

export default {
  title: "New fine-tuning job",
  async render(main, _params, ctx) {
    const [openapi, models, files] = await Promise.all([
      api("/openapi.json", {signal: ctx.signal}),
      api("/v1/models", {signal: ctx.signal}),
      listAll("/v1/files", {signal: ctx.signal, max: 500}),
    ]);
    const schemas = openapi.components.schemas;
    const entries = [];  // {name, control, kind, info, wrapper, resolved, defaultOption}

    /** A labelled control for one schema property, registered under its API path. */
    function schemaField(path, prop, {label, methods, sparseKinds} = {}) {
      const info = describe(prop, schemas);
      const kind = kindOf(info);
      const key = path.split(".").pop();
      let control;
      let defaultOption = null;
      if (kind === "enum" || kind === "tri") {
        defaultOption = h("option", {value: ""}, info.default !== undefined && info.default !== null
          ? `default (${shown(info.default)})` : "default");
        const options = kind === "tri" ? [["true", "on"], ["false", "off"]] : info.enum.map((v) => [v, v]);
        control = h("select", {name: path}, defaultOption, options.map(([value, text]) => h("option", {value}, text)));
      } else if (kind === "check") {
        control = h("input", {type: "checkbox", name: path, checked: Boolean(info.default)});
      } else if (kind === "text" && (info.maxLength || 0) > 200) {
        control = h("textarea", {name: path, rows: 2, placeholder: "default"});
      } else {
        const numeric = kind === "number" && !info.consts.length;
        control = h("input", {type: "text", name: path, autocomplete: "off", spellcheck: "false",
          inputmode: numeric ? (info.type === "integer" ? "numeric" : "decimal") : null,
          placeholder: info.default !== undefined && info.default !== null ? shown(info.default) : "default"});
      }
      const wrapper = field(label || LABELS[key] || humanize(key), control, {hint: hintText(info)});
      if (kind === "check") wrapper.classList.add("check-field");
      if (methods) wrapper.dataset.methods = methods.join(" ");
      if (sparseKinds) wrapper.dataset.sparseKinds = sparseKinds.join(" ");
      const resolved = h("p", {class: "hint resolved"});
      wrapper.insertBefore(resolved, wrapper.querySelector(".field-error"));
      entries.push({name: path, control, kind, info, wrapper, resolved, defaultOption,
        initial: defaultOption ? defaultOption.textContent : control.placeholder});
      return wrapper;
    }

    function choiceField(name, label, options, {hint, selected} = {}) {
      const control = h("select", {name}, options.map(([value, text]) => h("option", {value, selected: value === selected}, text)));
      const wrapper = field(label, control, {hint});
      entries.push({name, control, kind: "choice", info: {consts: []}, wrapper, resolved: null, defaultOption: null});
      return wrapper;
    }

    // The job's inputs: the base model and the team's processed files.
    const bases = models.data.filter((m) => !m.parent);
    const adapters = models.data.filter((m) => m.parent);
    const processed = files.filter((f) => f.status === "processed" && f.purpose === "fine-tune");
    const wanted = ctx.query.get("training_file") || "";
    const fileOptions = processed.map((f) => [f.id, `${f.filename} (${f.id}, ${f.n_examples} examples)`]);
    const trainingOptions = [["", "Choose a processed file…"], ...fileOptions];
    if (wanted && !processed.some((f) => f.id === wanted)) trainingOptions.push([wanted, `${wanted} (not processed)`]);
    const jobProps = schemas.JobCreate.properties;
    const inputs = h("fieldset", {}, h("legend", {}, "Job"), h("div", {class: "fields"},
      choiceField("model", "Base model", bases.length
        ? [...bases.map((m) => [m.id, m.id]), ...adapters.map((m) => [m.id, `continue from ${m.id}`])]
        : [["", "No base models registered"]],
        {hint: bases.length ? "A fine-tuned model continues from its weights, with its method and shape."
          : "An admin registers one with: patchbay models add <id> <folder>"}),
      choiceField("method.type", "Training method",
        [["supervised", "supervised (examples)"], ["dpo", "DPO (preference pairs)"]]),
      choiceField("training_file", "Training file", trainingOptions, {selected: wanted,
        hint: processed.length ? null : "Upload a dataset on the Datasets page first."}),
      choiceField("validation_file", "Validation file", [["", "none"], ...fileOptions]),
      schemaField("suffix", jobProps.suffix, {label: "Suffix"}),
      schemaField("seed", jobProps.seed, {label: "Seed"})));

    const hyperProps = schemas.Hyperparameters.properties;
    const betaField = schemaField("method.dpo.hyperparameters.beta", schemas.DpoHyperparameters.properties.beta,
      {label: "Beta (DPO)"});
    betaField.dataset.methodTypes = "dpo";
    const hyper = h("fieldset", {}, h("legend", {}, "Hyperparameters"), h("div", {class: "fields"},
      Object.entries(hyperProps).map(([name, prop]) => schemaField(`hyperparameters.${name}`, prop)), betaField));

    // The method, its own parameters, the techniques and the recipe, from PeftConfigSpec.
    const peftProps = schemas.PeftConfigSpec.properties;
    const placed = new Set([...METHOD_FIELDS, ...TECHNIQUE_FIELDS, "sparse", ...Object.keys(METHOD_OBJECTS)]);
    const methodFields = METHOD_FIELDS.filter((n) => peftProps[n]).map((name) => (name === "method"
      ? methodSelect(peftProps.method)
      : schemaField(`peft.${name}`, peftProps[name], {methods: RANKED_FIELDS.includes(name) ? RANKED_METHODS : null})));
    const methodObjects = Object.entries(METHOD_OBJECTS).filter(([name]) => peftProps[name]).map(([name, spec]) =>
      h("fieldset", {class: "method-object", dataset: {methods: spec.methods.join(" ")}},
        h("legend", {}, `${spec.legend} (peft.${name})`),
        h("div", {class: "fields"}, Object.entries(schemas[spec.schema].properties).map(([key, prop]) =>
          schemaField(`peft.${name}.${key}`, prop, {methods: name === "prompt" ? PROMPT_OWNERS[key] : null})))));

    function methodSelect(prop) {
      const info = describe(prop, schemas);
      const control = h("select", {name: "peft.method"},
        info.enum.map((m) => h("option", {value: m, selected: m === info.default}, m)));
      const wrapper = field("Method", control, {hint: hintText(info)});
      entries.push({name: "peft.method", control, kind: "choice", info, wrapper, resolved: null, defaultOption: null});
      return wrapper;
    }

    const sparseProps = schemas.SparseSpec ? schemas.SparseSpec.properties : {};
    const techniques = h("fieldset", {}, h("legend", {}, "Techniques"), h("div", {class: "fields"},
      TECHNIQUE_FIELDS.filter((n) => peftProps[n]).map((n) => schemaField(`peft.${n}`, peftProps[n])),
      Object.entries(sparseProps).map(([key, prop]) => {
        if (key === "kind") {
          const wrapper = schemaField("peft.sparse.kind", prop, {label: LABELS.kind});
          wrapper.querySelector("option[value='']").textContent = "off";
          entries[entries.length - 1].initial = "off";
          return wrapper;
        }
        return schemaField(`peft.sparse.${key}`, prop, {sparseKinds: SPARSE_TOP_K_ONLY.includes(key) ? ["top_k"] : sparseProps.kind.enum});
      })));

    const recipe = h("fieldset", {}, h("legend", {}, "Training recipe"), h("div", {class: "fields"},
      Object.entries(peftProps).filter(([name]) => !placed.has(name)).map(([name, prop]) => schemaField(`peft.${name}`, prop))));

    // Metadata: key/value rows, at most as many as the API takes.
    const maxPairs = describe(jobProps.metadata, schemas).maxProperties || 16;
    const metadataRows = h("div", {class: "metadata-rows"});
    const addPair = h("button", {type: "button", class: "secondary", id: "add-metadata"}, "Add metadata pair");
    const metadataField = h("div", {class: "field wide", dataset: {field: "metadata"}},
      metadataRows, addPair, h("p", {class: "field-error", role: "alert"}));
    function addMetadataRow() {
      const n = metadataRows.children.length + 1;
      const row = h("div", {class: "metadata-row"},
        h("label", {}, "Key", h("input", {type: "text", name: "metadata", class: "metadata-key", autocomplete: "off"})),
        h("label", {}, "Value", h("input", {type: "text", name: "metadata", class: "metadata-value", autocomplete: "off"})),
        h("button", {type: "button", class: "secondary", "aria-label": `Remove metadata pair ${n}`,
          onclick: () => { row.remove(); addPair.disabled = false; schedule(); }}, "Remove"));
      metadataRows.append(row);
      addPair.disabled = metadataRows.children.length >= maxPairs;
    }
    addPair.addEventListener("click", () => { addMetadataRow(); metadataRows.lastChild.querySelector("input").focus(); });
    addMetadataRow();
    const metadata = h("fieldset", {}, h("legend", {}, "Metadata"), metadataField);

    const formErrors = h("div", {id: "job-form-errors"});
    const preview = h("p", {id: "job-preview", class: "meta", "aria-live": "polite"}, "Choose a training file to preview the job.");
    const submit = h("button", {type: "submit"}, "Create job");
    const form = h("form", {id: "job-form", novalidate: true}, inputs, hyper,
      h("fieldset", {}, h("legend", {}, "Method"), h("div", {class: "fields"}, methodFields), methodObjects),
      techniques, recipe, metadata, preview, formErrors, h("div", {class: "actions"}, submit));
    const byName = (name) => entries.find((e) => e.name === name);

    /** Show only what the chosen method (and sparse kind) uses. */
    function updateVisibility() {
      const method = byName("peft.method").control.value;
      const sparseEntry = byName("peft.sparse.kind");
      const sparseKind = sparseEntry ? sparseEntry.control.value : "";
      for (const el of form.querySelectorAll("[data-methods]")) el.hidden = !el.dataset.methods.split(" ").includes(method);
      for (const el of form.querySelectorAll("[data-sparse-kinds]")) el.hidden = !el.dataset.sparseKinds.split(" ").includes(sparseKind);
      const methodType = byName("method.type").control.value;
      for (const el of form.querySelectorAll("[data-method-types]")) el.hidden = !el.dataset.methodTypes.split(" ").includes(methodType);
    }

    /** The request body: every visible control that holds a value, and the metadata pairs. */
    function body() {
      const out = {};
      for (const entry of entries) {
        if (isHidden(entry.wrapper)) continue;
        const value = valueOf(entry);
        if (value !== undefined) setPath(out, entry.name, value);
      }
      const pairs = {};
      let any = false;
      for (const row of metadataRows.children) {
        const key = row.querySelector(".metadata-key").value;
        const value = row.querySelector(".metadata-value").value;
        if (key === "" && value === "") continue;
        pairs[key] = value;
        any = true;
      }
      if (any) out.metadata = pairs;
      // A DPO job takes every hyperparameter inside OpenAI's method object; supervised keeps the top-level form.
      if (out.method && out.method.type === "dpo") {
        const dpo = out.method.dpo || {};
        out.method.dpo = {...dpo, hyperparameters: {...(out.hyperparameters || {}), ...(dpo.hyperparameters || {})}};
        delete out.hyperparameters;
      } else {
        delete out.method;
      }
      return out;
    }

    function clearErrors() {
      for (const el of form.querySelectorAll(".field.invalid")) el.classList.remove("invalid");
      for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
      replace(formErrors);
    }

    /** The visible field a problem's param names: itself, the nearest enclosing field, or a child its message names. */
    function fieldFor(param, message) {
      if (!param) return null;
      param = param.replace(/^method\.dpo\.hyperparameters\.(?!beta$)/, "hyperparameters.");  // DPO's share the fields
      const visible = (name) => form.querySelector(`.field[data-field="${CSS.escape(name)}"]:not([hidden])`);
      const parts = param.split(".");
      for (let n = parts.length; n > 0; n -= 1) {
        const el = visible(parts.slice(0, n).join("."));
        if (el && !isHidden(el)) return el;
      }
      const child = entries.find((e) => e.name.startsWith(`${param}.`) && !isHidden(e.wrapper)
        && new RegExp(`\\b${e.name.split(".").pop()}\\b`).test(message || ""));
      return child ? child.wrapper : null;
    }

    /** Put each problem beside its field; return the ones no visible field claims. */
    function showProblems(problems) {
      const left = [];
      for (const problem of problems) {
        const el = fieldFor(problem.param, problem.message);
        if (!el) { left.push(problem); continue; }
        el.classList.add("invalid");
        const slot = el.querySelector(".field-error");
        const message = String(problem.message).replace(/^Value error, /, "");
        slot.textContent = slot.textContent ? `${slot.textContent} ${message}` : message;
      }
      return left;
    }

    function showResolved(result) {
      for (const entry of entries) {
        if (!entry.resolved) continue;
        const [head, ...rest] = entry.name.split(".");
        const value = result && (head === "hyperparameters" || head === "peft") ? getPath(result[head], rest) : undefined;
        const empty = valueOf(entry) === undefined || valueOf(entry) === "auto";
        const known = value !== undefined && value !== null;
        entry.resolved.textContent = known && empty ? `resolves to ${shown(value)}` : "";
        const text = known && entry.name !== "peft.sparse.kind" ? shown(value) : null;
        if (entry.defaultOption) entry.defaultOption.textContent = text ? `default (${text})` : entry.initial;
        else if (entry.kind !== "check") entry.control.placeholder = text || entry.initial;
      }
    }

    function summary(result) {
      const hp = result.hyperparameters;
      const lr = result.peft && result.peft.learning_rate;
      return `${result.expected_steps ?? "?"} optimizer steps: ${hp.n_epochs} epoch(s) over ${result.training_examples} `
        + `training examples in batches of ${hp.batch_size}${lr ? `, learning rate ${Number(Number(lr).toPrecision(3))}` : ""}`
        + ` (${result.peft ? result.peft.method : "?"}).`;
    }

    let timer = null;
    let inflight = null;
    let lastResult = null;  // the newest successful dry run, until one fails
    function cancelDryRun() {
      clearTimeout(timer);
      if (inflight) inflight.abort();
      inflight = null;
    }
    ctx.signal.addEventListener("abort", cancelDryRun);

    /** Ask the API how the form would resolve (nothing is created); show it, or its problems, quietly. */
    async function dryRun() {
      const spec = body();
      if (!spec.training_file || !spec.model) {
        lastResult = null;
        showResolved(null);
        preview.textContent = "Choose a base model and a training file to preview the job.";
        return;
      }
      const controller = new AbortController();
      inflight = controller;
      try {
        const result = await api("/v1/fine_tuning/jobs?dry_run=true", {method: "POST", json: spec, signal: controller.signal});
        if (controller.signal.aborted) return;
        clearErrors();
        lastResult = result;
        showResolved(result);
        preview.textContent = summary(result);
      } catch (err) {
        if (controller.signal.aborted || err.name === "AbortError") return;
        clearErrors();
        lastResult = null;  // what resolved before may no longer hold (another method resolves differently)
        showResolved(null);
        if (err.status === 400) {
          const left = showProblems(err.problems);
          preview.textContent = left.length ? `Not valid yet: ${left.map((p) => p.message).join("; ")}` : "Not valid yet: see the marked fields.";
        } else {
          preview.textContent = `No preview: ${err.message}`;
        }
      } finally {
        if (inflight === controller) inflight = null;
      }
    }

    function schedule() {
      cancelDryRun();
      if (!ctx.signal.aborted) timer = setTimeout(dryRun, DRY_RUN_DELAY_MS);
    }

    form.addEventListener("change", () => { updateVisibility(); schedule(); });
    form.addEventListener("input", () => { showResolved(lastResult); schedule(); });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      cancelDryRun();
      clearErrors();
      submit.disabled = true;
      try {
        const job = await api("/v1/fine_tuning/jobs", {method: "POST", json: body(), signal: ctx.signal});
        ctx.navigate(`#/jobs/${encodeURIComponent(job.id)}`);
      } catch (err) {
        if (ctx.signal.aborted) return;
        const left = err.status === 400 ? showProblems(err.problems) : [];
        if (err.status !== 400) replace(formErrors, errorBox(err));
        else if (left.length) {
          replace(formErrors, h("div", {class: "error-box", role: "alert"}, h("strong", {}, "The job was not created:"),
            h("ul", {}, left.map((p) => h("li", {}, p.param ? `${p.param}: ${p.message}` : p.message)))));
        }
        const first = form.querySelector(".field.invalid input, .field.invalid select, .field.invalid textarea");
        if (first) first.focus();
        else if (formErrors.firstChild) formErrors.scrollIntoView({block: "nearest"});
      } finally {
        submit.disabled = false;
      }
    });

    updateVisibility();
    replace(main, h("div", {class: "page-head"}, h("h1", {}, "New fine-tuning job")),
      bases.length ? null : h("p", {class: "empty"}, "No base model is registered yet, so no job can be created."),
      form);
    if (wanted) dryRun();
  },
};
