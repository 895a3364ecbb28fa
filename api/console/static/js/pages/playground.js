// Playground: one chat request streamed to two to four models at once, the answers side by side with their
// time to first token, tokens per second and finish reason.
import {api, streamEvents} from "../api.js";
import {errorBox, field, h, replace} from "../dom.js";

const MIN_MODELS = 2;
const MAX_MODELS = 4;

/** How a model of `/v1/models` is described next to its checkbox. */
function describe(model) {
  if (!model.parent) return "base model";
  const base = model.parent ? ` of ${model.parent}` : "";
  return model.id.includes(":") ? `alias${base}` : `adapter${base}`;
}

/** The models fieldset: a checkbox per model, with `preselected` ids checked. */
function modelPicker(models, preselected) {
  if (!models.length) return h("p", {class: "empty"}, "No model is registered yet: type a model id below.");
  return h("div", {class: "model-choices"}, models.map((model, i) => {
    const box = h("input", {type: "checkbox", name: "model", value: model.id, id: `model-${i}`,
      checked: preselected.has(model.id)});
    return h("div", {class: "check"}, box,
      h("label", {for: box.id}, h("code", {}, model.id), " ", h("span", {class: "meta"}, describe(model))));
  }));
}

/** One earlier exchange of the conversation: a user message and the assistant's reply. */
function turnEditor(number, onRemove) {
  const user = h("textarea", {class: "turn-user", rows: 2});
  const assistant = h("textarea", {class: "turn-assistant", rows: 2});
  const row = h("div", {class: "turn fields"},
    field(`Earlier user message ${number}`, user),
    field(`Assistant reply ${number}`, assistant),
    h("div", {class: "actions"}, h("button", {type: "button", class: "secondary",
      "aria-label": `Remove earlier turn ${number}`, onclick: () => onRemove(row)}, "Remove turn")));
  return row;
}

/** An answer card and the functions that fill it as its stream goes. */
function answerCard(model) {
  const text = document.createTextNode("");
  const ttft = h("span", {class: "ttft"}, "…");
  const tps = h("span", {class: "tps"}, "…");
  const finish = h("span", {class: "finish"}, "…");
  const problem = h("div", {class: "answer-error"});
  const article = h("article", {class: "answer card", dataset: {model}, "aria-busy": "true"},
    h("h3", {}, model),
    h("div", {class: "answer-text"}, text),
    h("p", {class: "answer-meta meta"},
      "TTFT ", ttft, " ms · ", tps, " tokens/s · finish: ", finish),
    problem);
  return {
    article,
    append: (chunk) => text.appendData(chunk),
    metrics(values) {
      if ("ttft" in values) ttft.textContent = values.ttft;
      if ("tps" in values) tps.textContent = values.tps;
      if ("finish" in values) finish.textContent = values.finish;
    },
    fail: (err) => replace(problem, errorBox(err)),
    done() { article.dataset.done = "1"; article.removeAttribute("aria-busy"); },
  };
}

/**
 * Stream one chat completion into its card. Times are from `startedAt` (the click) to the first content
 * chunk, then from the first to the last; tokens are the usage chunk's count, else the content chunks.
 */
async function streamInto(card, request, startedAt, signal) {
  let first = null, last = null, chunks = 0, completionTokens = null, finish = null;
  try {
    for await (const event of streamEvents("/v1/chat/completions", {method: "POST", json: request, signal})) {
      if (event.error) throw event;  // an error reported inside the stream
      if (event.usage && typeof event.usage.completion_tokens === "number") completionTokens = event.usage.completion_tokens;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      const content = choice.delta && choice.delta.content;
      if (content) {
        last = performance.now();
        if (first === null) {
          first = last;
          card.metrics({ttft: String(Math.round(first - startedAt))});
        }
        chunks += 1;
        card.append(content);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (err) {
    if (err && err.name === "AbortError") finish = "stopped";
    else {
      finish = "error";
      card.fail(err);
    }
  } finally {
    const tokens = completionTokens ?? chunks;
    const seconds = first !== null && last > first ? (last - first) / 1000 : 0;
    card.metrics({ttft: first === null ? "—" : String(Math.round(first - startedAt)),
      tps: seconds > 0 && tokens > 0 ? (tokens / seconds).toFixed(1) : "—", finish: finish || "—"});
    card.done();
  }
}

export default {
  title: "Playground",
  async render(main, _params, ctx) {
    let models = [];
    let modelsError = null;
    try {
      models = (await api("/v1/models", {signal: ctx.signal})).data;
    } catch (err) {
      if (err.name === "AbortError") throw err;
      modelsError = err;
    }
    // ?model=X preselects X and the base it was trained from; an id not listed goes to "Other model id".
    const wanted = ctx.query.get("model");
    const known = models.find((m) => m.id === wanted);
    // An unlisted version (name@7) still brings its base when another version of `name` is listed.
    const sibling = wanted && !known ? models.find((m) => m.parent && m.id.split(/[@:]/)[0] === wanted.split(/[@:]/)[0]) : null;
    const preselected = new Set([known && known.id, known ? known.parent : sibling && sibling.parent].filter(Boolean));

    const extra = h("input", {type: "text", id: "extra-model", name: "extra_model", autocomplete: "off",
      spellcheck: "false", placeholder: "e.g. my-adapter@3", value: wanted && !known ? wanted : undefined});
    const modelsProblem = h("p", {class: "field-error", id: "models-error", role: "alert"});
    const system = h("textarea", {id: "system-prompt", name: "system", rows: 2});
    const prompt = h("textarea", {id: "prompt", name: "prompt", rows: 4, required: true});
    const temperature = h("input", {id: "temperature", name: "temperature", type: "number", step: "0.1", min: "0",
      max: "2", value: "0.7", required: true});
    const maxTokens = h("input", {id: "max-tokens", name: "max_tokens", type: "number", min: "1", step: "1",
      value: "128", required: true});
    const turns = h("div", {class: "turns"});
    const send = h("button", {type: "submit", id: "send"}, "Send to all");
    const stop = h("button", {type: "button", id: "stop", class: "secondary", disabled: true}, "Stop");
    const answers = h("section", {class: "answers", "aria-label": "Answers", "aria-live": "polite"});

    const renumber = () => turns.querySelectorAll(".turn").forEach((row, i) => {
      row.querySelectorAll("label")[0].textContent = `Earlier user message ${i + 1}`;
      row.querySelectorAll("label")[1].textContent = `Assistant reply ${i + 1}`;
      row.querySelector("button").setAttribute("aria-label", `Remove earlier turn ${i + 1}`);
    });
    const removeTurn = (row) => { row.remove(); renumber(); };
    const addTurn = () => {
      const row = turnEditor(turns.children.length + 1, removeTurn);
      turns.append(row);
      row.querySelector("textarea").focus();
    };

    const form = h("form", {id: "playground-form", class: "card", novalidate: true},
      h("fieldset", {id: "models"},
        h("legend", {}, `Models (pick ${MIN_MODELS} to ${MAX_MODELS})`),
        modelsError ? errorBox(modelsError) : modelPicker(models, preselected),
        field("Other model id", extra, {hint: "Any model id not listed, such as a pinned version name@3."}),
        modelsProblem),
      h("div", {class: "fields"},
        field("System prompt", system, {wide: true, hint: "Optional."}),
        h("div", {class: "field wide"}, turns,
          h("div", {}, h("button", {type: "button", class: "secondary", id: "add-turn", onclick: addTurn},
            "Add an earlier turn"))),
        field("Message", prompt, {wide: true, hint: "Ctrl+Enter sends."}),
        field("Temperature", temperature),
        field("Max tokens", maxTokens)),
      h("div", {class: "actions"}, send, stop));

    /** The chosen model ids (checked boxes, then the free-text one), without repeats. */
    const chosen = () => [...new Set([
      ...[...form.querySelectorAll("input[name=model]:checked")].map((box) => box.value),
      extra.value.trim(),
    ].filter(Boolean))];

    /** The chat messages: optional system, the earlier turns, then the message. */
    const messages = () => {
      const out = system.value.trim() ? [{role: "system", content: system.value}] : [];
      for (const row of turns.querySelectorAll(".turn")) {
        const user = row.querySelector(".turn-user").value;
        const assistant = row.querySelector(".turn-assistant").value;
        if (user.trim()) out.push({role: "user", content: user});
        if (assistant.trim()) out.push({role: "assistant", content: assistant});
      }
      out.push({role: "user", content: prompt.value});
      return out;
    };

    const setError = (control, message) => {
      const slot = control === "models" ? modelsProblem : document.getElementById(`${control.id}-error`);
      slot.textContent = message || "";
      if (control !== "models") control.closest(".field").classList.toggle("invalid", Boolean(message));
    };

    /** Check the form; every problem is shown beside its field. */
    const validate = () => {
      const ids = chosen();
      const problems = [
        ["models", ids.length < MIN_MODELS || ids.length > MAX_MODELS
          ? `Pick ${MIN_MODELS} to ${MAX_MODELS} models to compare (${ids.length} chosen).` : ""],
        [prompt, prompt.value.trim() ? "" : "Write a message."],
        [temperature, temperature.value !== "" && Number(temperature.value) >= 0 && Number(temperature.value) <= 2
          ? "" : "Temperature is a number from 0 to 2."],
        [maxTokens, Number.isInteger(Number(maxTokens.value)) && Number(maxTokens.value) >= 1 && maxTokens.value !== ""
          ? "" : "Max tokens is a whole number of at least 1."],
      ];
      for (const [control, message] of problems) setError(control, message);
      const firstBad = problems.find(([, message]) => message);
      if (firstBad) (firstBad[0] === "models" ? form.querySelector("input[name=model], #extra-model") : firstBad[0]).focus();
      return !firstBad;
    };

    let running = null;  // the AbortController of the streams on screen
    ctx.signal.addEventListener("abort", () => running && running.abort());
    stop.addEventListener("click", () => running && running.abort());

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (running || !validate()) return;
      const startedAt = performance.now();
      const controller = new AbortController();
      running = controller;
      const base = {messages: messages(), temperature: Number(temperature.value), max_tokens: Number(maxTokens.value)};
      const cards = chosen().map((model) => ({model, card: answerCard(model)}));
      replace(answers, cards.map(({card}) => card.article));
      send.disabled = true;
      stop.disabled = false;
      await Promise.all(cards.map(({model, card}) => streamInto(card, {
        model, messages: base.messages, temperature: base.temperature, max_tokens: base.max_tokens,
        stream: true, stream_options: {include_usage: true},
      }, startedAt, controller.signal)));
      running = null;
      if (ctx.signal.aborted) return;
      send.disabled = false;
      stop.disabled = true;
    });
    prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        form.requestSubmit();
      }
    });

    replace(main, h("div", {class: "page-head"}, h("h1", {}, "Playground")),
      h("p", {class: "meta"}, "Send one conversation to several models at once and compare their answers."),
      form, answers);
  },
};
