"""Multi-adapter inference: one shared base model, many LoRA adapters batched together per forward pass."""
