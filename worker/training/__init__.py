"""Fine-tuning with every peft.method: device choice, model loading, methods, data, checkpoints and the recipe."""
