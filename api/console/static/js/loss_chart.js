// The loss chart of a job: its series, fed by metrics events, and its plotly.js layout.

/** Chart colours from the stylesheet's variables, so the chart reads in light and dark. */
function chartTheme() {
  const css = getComputedStyle(document.documentElement);
  const v = (name) => css.getPropertyValue(name).trim();
  return {text: v("--text"), grid: v("--border"), train: v("--accent"), valid: v("--ok"), lr: v("--warn")};
}

/** The chart's layout: two y axes (loss, learning rate), sized for a phone when `narrow`. */
export function chartLayout(narrow, empty, revision) {
  const t = chartTheme();
  const axis = {gridcolor: t.grid, zerolinecolor: t.grid, linecolor: t.grid, automargin: true, visible: !empty};
  return {
    paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
    font: {color: t.text, size: narrow ? 11 : 12},
    margin: {l: 10, r: 10, t: narrow ? 10 : 44, b: 10},
    showlegend: true,
    // Above the plot when there is room, below it on a phone.
    legend: narrow ? {orientation: "h", x: 0, y: -0.12, yanchor: "top"}
      : {orientation: "h", x: 0, y: 1, yref: "container", yanchor: "top"},
    xaxis: {...axis, title: {text: narrow ? "" : "Step"}},
    yaxis: {...axis, title: {text: "Loss"}},
    yaxis2: {...axis, title: {text: "Learning rate"}, overlaying: "y", side: "right", showgrid: false,
      tickformat: ".1e", rangemode: "tozero"},
    uirevision: "loss",  // keep the user's zoom across redraws
    datarevision: revision,  // the traces' arrays grow in place: tell react they changed
    hovermode: "x unified",
  };
}

/** The loss chart's data: train and validation loss and the learning rate per step. */
export class LossSeries {
  constructor() { this.train = {x: [], y: []}; this.valid = {x: [], y: []}; this.lr = {x: [], y: []}; }

  /** Add one metrics event; a step at or before the last one (a resume from a checkpoint) replaces what followed. */
  add(m) {
    if (typeof m.step !== "number") return;
    for (const s of [this.train, this.valid, this.lr]) {
      let keep = s.x.length;
      while (keep > 0 && s.x[keep - 1] >= m.step) keep -= 1;
      s.x.length = keep; s.y.length = keep;
    }
    if (m.train_loss !== null && m.train_loss !== undefined) { this.train.x.push(m.step); this.train.y.push(m.train_loss); }
    if (m.valid_loss !== null && m.valid_loss !== undefined) { this.valid.x.push(m.step); this.valid.y.push(m.valid_loss); }
    if (m.learning_rate !== null && m.learning_rate !== undefined) { this.lr.x.push(m.step); this.lr.y.push(m.learning_rate); }
  }

  /** Plotly traces: train loss, validation loss (when the job has a validation file), learning rate. */
  traces(withValid) {
    const t = chartTheme();
    const out = [{...this.train, name: "Train loss", type: "scatter", mode: "lines", line: {color: t.train, width: 2}}];
    if (withValid) {
      out.push({...this.valid, name: "Validation loss", type: "scatter", mode: "lines+markers",
        line: {color: t.valid, width: 2}, marker: {size: 6}});
    }
    out.push({...this.lr, name: "Learning rate", type: "scatter", mode: "lines", yaxis: "y2",
      line: {color: t.lr, width: 1.5, dash: "dot"}});
    return out;
  }
}
