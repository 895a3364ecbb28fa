"""Adapter artifact formats: how each kind is written, read back for training, and read for serving.

One module per kind. Training imports this package to save an artifact and to rebuild a trained
model; inference imports it to load adapters into its slots; it imports neither of them.

| kind (`peft_type` in adapter_config.json) | module | written by | read for serving by |
|---|---|---|---|
| LORA (DoRA: `use_dora`) | `lora` | peft (`peft_artifact`) | `read_lora_adapter` |
| ADALORA | `adalora` | peft (`peft_artifact`) | `read_adalora_modules` |
| IA3 | `ia3` | peft (`peft_artifact`) | `read_ia3_gains` |
| LOHA, LOKR, HRA | `weight_deltas` | peft (`peft_artifact`) | `read_weight_deltas` |
| PROMPT_TUNING, P_TUNING, PREFIX_TUNING | `prompt_learning` | peft (`peft_artifact`) | `read_prompt_learning` |
| BOTTLENECK_ADAPTER (`patchbay.bottleneck/v1`) | `bottleneck` | `write_bottleneck_folder` | `read_bottleneck` |
| sparse deltas (beside any kind) | `sparse_deltas` | `write_sparse_deltas` | `read_served_sparse_deltas` |

Shared: `files` (file names, safetensors/config reading, `AdapterLoadError`); `served` dispatches on
`peft_type` (`read_served_adapter`) and returns every term one adapter adds to the base.

Who calls what:
- Saving (training): `worker.training.methods` write the method's artifact (`PeftMethod.save` through
  `peft_artifact.write_peft_artifact`, `BottleneckMethod.save` through `write_bottleneck_folder`);
  `worker.training.techniques.sparse.SparseTraining.save` calls `write_sparse_deltas`.
- Rebuilding a trained model (`worker.training.artifacts.load_trained_model`): `peft_artifact.load_peft_artifact`;
  bottleneck: `read_bottleneck_folder`, hooked in by `worker.training.methods.bottleneck_module`; sparse:
  `has_sparse_config` / `read_sparse_deltas`, added in place by `worker.training.techniques.sparse_apply`.
- Serving: `worker.inference.adapter_slots` calls `served.read_served_adapter`; the slots modules use the
  per-kind result types (`LoraModuleWeights`, `Ia3Gain`, `DenseDelta`, `BottleneckAdapter`, `VirtualTokens`,
  `PrefixKV`); `worker.inference.merge` reads LoRA with `read_lora_adapter`.

The split: this package turns files into checked tensors and back, and holds no part of a live model.
Putting tensors into a model is the caller's work: the bottleneck `nn.Module` and its hooks, and
adding sparse deltas to a base, are training code; the per-row slots are inference code.
"""
