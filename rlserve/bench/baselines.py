"""The transformers ``generate`` baseline: every sequence in one batch, sdpa attention, fixed lengths."""

from __future__ import annotations

import time

import torch


def load_hf_model(model_dir, dtype: torch.dtype, device: torch.device, random_weights: bool):
    from transformers import AutoConfig, AutoModelForCausalLM
    if random_weights:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


@torch.inference_mode()
def hf_generate_throughput(model, prompts: list[list[int]], n: int, max_tokens: list[int]) -> dict:
    """Tokens per second of one batched ``generate`` call (temperature 1, top_p 1, min = max new tokens).

    ``generate`` cannot stop a row early, so with different ``max_tokens`` (rl-varlen) every row runs to the
    largest: it *generates* ``longest * rows`` tokens, of which only each prompt's ``max_tokens`` were asked for
    (*useful*, what rlserve generates). ``tokens_per_s`` counts useful tokens, the figure compared with rlserve;
    ``generated_tokens_per_s`` counts everything it computed. For fixed lengths the two are equal."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    longest = max(max_tokens)
    kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                  max_new_tokens=longest, min_new_tokens=longest, num_return_sequences=n, pad_token_id=0)
    model.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]),
                   **dict(kwargs, max_new_tokens=4, min_new_tokens=4))  # warm-up
    _sync(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + longest
    useful = sum(max_tokens) * n
    generated = (out.shape[1] - ids.shape[1]) * out.shape[0]
    return {"seconds": seconds, "useful_tokens": useful, "generated_tokens": generated,
            "tokens_per_s": useful / seconds, "generated_tokens_per_s": generated / seconds}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
