"""The peft config object for each peft-backed method of a resolved job spec."""

from __future__ import annotations

from peft import (
    AdaLoraConfig,
    HRAConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
)
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)
from torch import nn

from core.schemas.training import ResolvedTraining
from worker.model_parts import decoder_layers

TASK = "CAUSAL_LM"
# IA3's usual choice (keys, values, the MLP's output projection) under common module names, for
# architectures peft has no mapping for.
_IA3_KEY_VALUE_NAMES = ("k_proj", "v_proj", "key", "value", "k", "v")
_IA3_FEEDFORWARD_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2", "wo")


def _targets(config: ResolvedTraining) -> str | list[str]:
    targets = config.peft.target_modules
    return "all-linear" if targets == "all-linear" else list(targets)


def lora_config(config: ResolvedTraining) -> LoraConfig:
    """LoRA for qlora/lora, with DoRA's magnitude vector for dora."""
    spec = config.peft
    return LoraConfig(
        task_type=TASK, r=spec.r, lora_alpha=config.lora_alpha, lora_dropout=spec.dropout,
        target_modules=_targets(config), use_dora=spec.method == "dora", bias="none",
    )


def adalora_schedule(tinit: int, tfinal: int, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) clipped so that a budgeting phase remains: 0 <= tinit < total_steps - tfinal."""
    total_steps = max(total_steps, 1)
    tfinal = min(tfinal, total_steps - 1)
    tinit = min(tinit, total_steps - tfinal - 1)
    return tinit, tfinal


def adalora_config(config: ResolvedTraining, total_steps: int) -> AdaLoraConfig:
    """AdaLoRA pruning from `init_r` to an average rank of `r` over the run's real number of steps."""
    spec, ada = config.peft, config.peft.adalora
    tinit, tfinal = adalora_schedule(ada.tinit, ada.tfinal, total_steps)
    return AdaLoraConfig(
        task_type=TASK, init_r=ada.init_r, target_r=spec.r, lora_alpha=config.lora_alpha,
        lora_dropout=spec.dropout, target_modules=_targets(config), tinit=tinit, tfinal=tfinal,
        deltaT=ada.delta_t, beta1=ada.beta1, beta2=ada.beta2, orth_reg_weight=ada.orth_reg_weight,
        total_step=max(total_steps, 1),
    )


def _linear_names(causal_lm: nn.Module) -> list[str]:
    """Short names of the linears inside the first decoder layer, e.g. ["q_proj", ..., "down_proj"]."""
    layer = decoder_layers(causal_lm)[0]
    return [name.rsplit(".", 1)[-1] for name, module in layer.named_modules() if isinstance(module, nn.Linear)]


def ia3_modules(config: ResolvedTraining, causal_lm: nn.Module) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) for IA3: the spec's, else peft's defaults for the
    architecture, else the decoder's key, value and MLP-output linears."""
    ia3 = config.peft.ia3
    model_type = causal_lm.config.model_type
    linears = _linear_names(causal_lm)
    default_ff = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    if default_ff is None:
        default_ff = [name for name in linears if name in _IA3_FEEDFORWARD_NAMES][:1]
    targets = ia3.target_modules
    if targets is None:
        targets = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)
    if targets is None:
        targets = [name for name in linears if name in _IA3_KEY_VALUE_NAMES] + list(default_ff)
        if not targets:
            raise ValueError(
                f"IA3 has no default target modules for model type {model_type!r}; set peft.ia3.target_modules "
                f"(the decoder's linears are {sorted(set(linears))})"
            )
    targets = list(targets)
    feedforward = ia3.feedforward_modules
    if feedforward is None:
        feedforward = [name for name in default_ff if name in targets]
    return targets, list(feedforward)


def prompt_learning_config(config: ResolvedTraining, base_model_path: str) -> PeftConfig:
    """Prefix tuning, prompt tuning (optionally initialised from text) or P-tuning."""
    spec, prompt = config.peft, config.peft.prompt
    if spec.method == "prefix_tuning":
        return PrefixTuningConfig(
            task_type=TASK, num_virtual_tokens=prompt.num_virtual_tokens,
            prefix_projection=prompt.prefix_projection, encoder_hidden_size=prompt.encoder_hidden_size,
        )
    if spec.method == "prompt_tuning":
        if prompt.init_text:
            return PromptTuningConfig(
                task_type=TASK, num_virtual_tokens=prompt.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=prompt.init_text,
                tokenizer_name_or_path=base_model_path,
            )
        return PromptTuningConfig(
            task_type=TASK, num_virtual_tokens=prompt.num_virtual_tokens, prompt_tuning_init=PromptTuningInit.RANDOM
        )
    encoder = {"mlp": PromptEncoderReparameterizationType.MLP, "lstm": PromptEncoderReparameterizationType.LSTM}
    return PromptEncoderConfig(
        task_type=TASK, num_virtual_tokens=prompt.num_virtual_tokens,
        encoder_reparameterization_type=encoder[prompt.encoder], encoder_hidden_size=prompt.encoder_hidden_size,
    )


def peft_config_for(
    config: ResolvedTraining, causal_lm: nn.Module, *, base_model_path: str, total_steps: int
) -> PeftConfig:
    """The peft config of the job's method (every method except bottleneck_adapter)."""
    spec = config.peft
    method = spec.method
    if method in ("qlora", "lora", "dora"):
        return lora_config(config)
    if method == "adalora":
        return adalora_config(config, total_steps)
    if method == "loha":
        return LoHaConfig(task_type=TASK, r=spec.r, alpha=config.lora_alpha, rank_dropout=spec.dropout,
                          target_modules=_targets(config))
    if method == "lokr":
        return LoKrConfig(task_type=TASK, r=spec.r, alpha=config.lora_alpha, rank_dropout=spec.dropout,
                          target_modules=_targets(config))
    if method == "hra":
        return HRAConfig(task_type=TASK, r=spec.r, target_modules=_targets(config))
    if method == "ia3":
        targets, feedforward = ia3_modules(config, causal_lm)
        return IA3Config(task_type=TASK, target_modules=targets, feedforward_modules=feedforward)
    if method in ("prefix_tuning", "prompt_tuning", "p_tuning"):
        return prompt_learning_config(config, base_model_path)
    raise ValueError(f"method {method!r} is not a peft method")
