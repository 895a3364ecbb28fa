// Form controls from OpenAPI schema properties: what a property accepts, how to hint it, what a control sends.

/** A property of an OpenAPI schema, flattened: {type, nullable, consts, enum, items, bounds, default, description}. */
export function describe(prop, schemas) {
  const deref = (s) => (s && s.$ref ? schemas[s.$ref.split("/").pop()] : s);
  const info = {default: prop.default, description: prop.description, title: prop.title, nullable: false, consts: []};
  for (const variant of (prop.anyOf || [prop]).map(deref)) {
    if (variant.type === "null") info.nullable = true;
    else if (variant.const !== undefined) info.consts.push(variant.const);
    else if (variant.properties) { info.type = "object"; info.schema = variant; }
    else {
      Object.assign(info, {type: variant.type, enum: variant.enum, items: deref(variant.items),
        minimum: variant.minimum, maximum: variant.maximum, exclusiveMinimum: variant.exclusiveMinimum,
        exclusiveMaximum: variant.exclusiveMaximum, maxLength: variant.maxLength, maxProperties: variant.maxProperties});
    }
  }
  if (!info.type && info.consts.length) info.type = "string";
  return info;
}

/** A property's bounds as text, e.g. "≥ 1 and ≤ 256". */
export function rangeText(info) {
  const low = info.minimum !== undefined ? `≥ ${info.minimum}` : info.exclusiveMinimum !== undefined ? `> ${info.exclusiveMinimum}` : null;
  const high = info.maximum !== undefined ? `≤ ${info.maximum}` : info.exclusiveMaximum !== undefined ? `< ${info.exclusiveMaximum}` : null;
  return [low, high].filter(Boolean).join(" and ");
}

/** A default value as the form shows it. */
export const shown = (value) => (Array.isArray(value) ? value.join(", ") : typeof value === "boolean" ? (value ? "on" : "off") : String(value));

/** The hint under a control: description, bounds, list syntax and default. */
export function hintText(info) {
  const parts = [info.description, rangeText(info)];
  if (info.type === "array") parts.push(info.items && info.items.enum ? `comma-separated: ${info.items.enum.join(", ")}` : "comma-separated");
  if (info.consts.length && info.type === "array") parts.push(`or ${info.consts.join(", ")}`);
  if (info.default !== undefined && info.default !== null) parts.push(`default ${shown(info.default)}`);
  return parts.filter(Boolean).join(" · ");
}

/** The control kind for a schema property. */
export function kindOf(info) {
  // a checkbox only for a plain boolean with a boolean default; `true | false | "auto"` gets on / off / default
  if (info.type === "boolean") return info.nullable || typeof info.default !== "boolean" ? "tri" : "check";
  if (info.enum) return "enum";
  if (info.type === "integer" || info.type === "number") return "number";
  if (info.type === "array") return "list";
  return "text";
}

/** The value a control sends, or undefined when it is empty (the API's default then applies). */
export function valueOf(entry) {
  const {control, kind, info} = entry;
  if (kind === "check") return control.checked === Boolean(info.default) ? undefined : control.checked;
  const raw = control.value.trim();
  if (raw === "") return undefined;
  if (kind === "tri") return raw === "true";
  if (info.consts.includes(raw)) return raw;
  if (kind === "number") return raw !== "" && Number.isFinite(Number(raw)) ? Number(raw) : raw;
  if (kind === "list") return raw.split(",").map((s) => s.trim()).filter(Boolean);
  return raw;
}

/** Set `a.b.c` of an object, creating the objects on the way. */
export function setPath(target, path, value) {
  const parts = path.split(".");
  let node = target;
  for (const part of parts.slice(0, -1)) node = node[part] = node[part] || {};
  node[parts[parts.length - 1]] = value;
}

/** The value at a path of parts, or undefined. */
export function getPath(source, parts) {
  return parts.reduce((node, part) => (node && typeof node === "object" ? node[part] : undefined), source);
}
