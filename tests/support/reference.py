"""What plain peft generates locally: the reference the inference server must match."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=16)
def peft_greedy_chat(model_dir: Path, adapter_dir: Path | None, question: str, max_new_tokens: int) -> str:
    """Greedy chat reply from the base (fp32) with the adapter applied by `PeftModel`, or none."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    stop_ids = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None})
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                pad_token_id=tokenizer.pad_token_id)
    new_ids = output[0, inputs["input_ids"].shape[1]:].tolist()
    return tokenizer.decode(new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
