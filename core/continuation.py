"""Jobs that continue from a fine-tuned model: which adapters a job can start from, and the shape they pass on.

The child trains the parent's base model, starting from the parent's weights, so it must build exactly
the parent's shape: its method, `r`, `alpha` and `target_modules` (ranked methods) or its method's own
object (`ia3`, `prompt`, `bottleneck`). Where that shape comes from:

- an adapter a job trained: that job's resolved `peft` spec, the exact spec the worker built the
  artifact from, in the request's own terms ("all-linear" stays "all-linear");
- an imported adapter (no job): its stored `adapter_config.json`, accepted when it is plain LoRA that a
  job's spec can express.

The worker checks the weights against the model it builds anyway (`AttachedMethod.load_adapter_weights`).
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from core.errors import ApiError, invalid
from core.models import Adapter, Job
from core.schemas.common import FieldProblems
from core.schemas.peft_methods import RANKED_METHODS
from core.schemas.training import PeftConfigSpec, StartAdapter
from core.storage import StorageError, get_storage

METHOD_OBJECTS = {"ia3": "ia3", "prompt_tuning": "prompt", "prefix_tuning": "prompt",
                  "bottleneck_adapter": "bottleneck"}
"""The object of the `peft` spec that holds each (non-ranked) method's shape."""
_SAME_ARTIFACT = {"lora", "qlora"}
"""Methods whose artifacts are the same LoRA factors (qlora only quantizes the base while training)."""
_IMPORT_EXTRAS = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform",
                  "layer_replication", "lora_bias", "trainable_token_indices", "target_parameters")
"""adapter_config.json settings of an imported LoRA that a job's spec cannot express."""


def named(adapter: Adapter) -> str:
    """How messages name an adapter version: its fine-tuned model name (or name@version) and id."""
    return f"'{adapter.fine_tuned_model or f'{adapter.name}@{adapter.version}'}' ({adapter.id})"


def start_adapter_of(adapter: Adapter) -> StartAdapter:
    """What the worker needs to fetch the adapter's weights."""
    return StartAdapter(id=adapter.id, fine_tuned_model=adapter.fine_tuned_model, name=adapter.name,
                        version=adapter.version, storage_key=adapter.storage_key, sha256=adapter.sha256,
                        method=adapter.method)


def _refused(adapter: Adapter, why: str) -> ApiError:
    return invalid(f"A job cannot continue from {named(adapter)}: {why}.", "model", "model_not_continuable")


def _conflict(field: str, message: str) -> ApiError:
    """A conflicting field; it lists itself in `errors`, so that a lone conflict is listed too."""
    error = invalid(message, field, "conflicts_with_parent")
    error.extra = {"errors": [{"param": field, "message": message, "code": error.code}]}
    return error


def parent_spec(session: Session, adapter: Adapter) -> PeftConfigSpec:
    """The shape `adapter` was trained with (alpha resolved), or a 400 on `model` saying why there is none."""
    if (adapter.techniques or {}).get("sparse") is not None:
        raise _refused(adapter, "it carries sparse deltas of the base model's own weights, which a new adapter "
                                "cannot start from")
    if adapter.job_id is None:
        return _imported_spec(adapter)
    job = session.get(Job, adapter.job_id)
    resolved = (job.resolved if job is not None else None) or {}
    try:
        spec = PeftConfigSpec.model_validate(resolved["peft"])
    except (ValidationError, KeyError):
        raise _refused(adapter, f"the spec of job {adapter.job_id}, which trained it, is gone or no longer "
                                "valid") from None
    if spec.method == "adalora":
        raise _refused(adapter, "adalora pruned its ranks to a per-module pattern during training, which a new "
                                "run cannot restart from")
    if spec.method == "p_tuning" or (spec.method == "prefix_tuning" and spec.prompt and spec.prompt.prefix_projection):
        raise _refused(adapter, f"a {spec.method} artifact keeps only its prompt encoder's output, not the encoder "
                                "that training needs")
    if spec.method in RANKED_METHODS:
        return spec.model_copy(update={"alpha": resolved.get("lora_alpha") or spec.alpha or 2.0 * spec.r})
    return spec


def _imported_spec(adapter: Adapter) -> PeftConfigSpec:
    """An imported LoRA's shape, read from its stored `adapter_config.json`."""
    try:
        with get_storage().open_read(f"{adapter.storage_key}/adapter_config.json") as fh:
            config = json.loads(fh.read(1024 * 1024))
    except (StorageError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise _refused(adapter, "its stored adapter_config.json is missing or unreadable")
    extras = [key for key in _IMPORT_EXTRAS if config.get(key)]
    if config.get("bias") not in (None, "none"):
        extras.append("bias")
    if extras:
        raise _refused(adapter, f"its adapter_config.json sets {', '.join(extras)}, which a job's peft spec cannot "
                                "express")
    targets = config.get("target_modules")
    try:
        return PeftConfigSpec(method="lora", r=config.get("r"), alpha=config.get("lora_alpha") or config.get("r"),
                              target_modules=sorted(targets) if isinstance(targets, list) else targets)
    except ValidationError:
        raise _refused(adapter, "its rank, alpha or target_modules cannot be written as a job's peft spec "
                                "(target_modules must be a list of module names)") from None


def _same_targets(mine, theirs, adapter: Adapter) -> bool:
    """Whether the request's target_modules are the parent's: the same value, or its modules as a list."""
    known = [theirs] if isinstance(theirs, list) else []
    known.append(adapter.target_modules or [])  # what its adapter_config.json lists ("all-linear" expanded)
    return mine == theirs or (isinstance(mine, list) and any(set(mine) == set(k) for k in known))


def continued_peft(session: Session, adapter: Adapter, requested: PeftConfigSpec) -> tuple[PeftConfigSpec | None,
                                                                                            list[ApiError]]:
    """The request's `peft` with the parent's shape filled in where the request left it unset.

    Returns the spec and no problems, or None and a 400 for each field the request sets to another value
    than the parent's (each naming the parent) and each problem of the combined spec.
    """
    parent = parent_spec(session, adapter)
    given, problems, update = requested.model_fields_set, [], {}

    def conflict(field: str, mine, theirs) -> None:
        problems.append(_conflict(f"peft.{field}", f"peft.{field} is {mine!r}, but {named(adapter)}, which "
                                                   f"this job continues, has {theirs!r}; leave it out to inherit it"))

    update["method"] = parent.method
    if "method" in given and requested.method != parent.method:
        if {requested.method, parent.method} <= _SAME_ARTIFACT:
            update["method"] = requested.method
        else:
            conflict("method", requested.method, parent.method)
    if parent.method in RANKED_METHODS:
        update.update(r=parent.r, alpha=parent.alpha, target_modules=parent.target_modules)
        if "r" in given and requested.r != parent.r:
            conflict("r", requested.r, parent.r)
        if requested.alpha is not None and requested.alpha != parent.alpha:
            conflict("alpha", requested.alpha, parent.alpha)
        if "target_modules" in given and not _same_targets(requested.target_modules, parent.target_modules, adapter):
            conflict("target_modules", requested.target_modules, parent.target_modules)
    field = METHOD_OBJECTS.get(parent.method)
    if field is not None:
        mine, theirs = getattr(requested, field), getattr(parent, field)
        update[field] = theirs if theirs is not None else mine
        for name in sorted(mine.model_fields_set if mine is not None and theirs is not None else ()):
            if getattr(mine, name) != getattr(theirs, name):
                conflict(f"{field}.{name}", getattr(mine, name), getattr(theirs, name))
    if requested.sparse is not None:
        problems.append(invalid(f"Sparse fine-tuning trains the base's own weights beside the adapter, so it cannot "
                                f"start from {named(adapter)}; leave peft.sparse out.", "peft.sparse"))
    if problems:
        return None, problems
    data = requested.model_dump()
    data.update({k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in update.items()})
    try:
        return PeftConfigSpec.model_validate(data), []
    except ValidationError as exc:
        return None, _spec_problems(exc, adapter)


def _spec_problems(exc: ValidationError, adapter: Adapter) -> list[ApiError]:
    problems = []
    for err in exc.errors():
        found = (err.get("ctx") or {}).get("error")
        pairs = found.problems if isinstance(found, FieldProblems) else [("peft", str(err.get("msg")))]
        problems += [invalid(f"{reason} (the method and shape come from {named(adapter)}, which this job continues)",
                             field) for field, reason in pairs]
    return problems
