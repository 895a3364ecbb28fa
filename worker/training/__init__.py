"""QLoRA/LoRA/DoRA fine-tuning: device choice, model loading, data, checkpoints and the recipe."""
