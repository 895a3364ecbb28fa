"""The GPU/CPU worker: training (worker.training) and inference (worker.inference). Owns torch."""
