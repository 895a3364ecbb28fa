"""The GPU/CPU worker; owns torch. training/ and inference/ never import each other: they meet in formats/
(adapter artifacts), base_loading (the base model), device (CUDA when present) and model_parts."""
