"""`patchbay demo`: fine-tune SmolLM2 to a checkable behaviour and compare it with the base."""
