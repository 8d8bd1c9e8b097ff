"""The transformers side of the equivalence checks: what greedy decoding of the same weights yields."""

from __future__ import annotations

import torch

from rlserve.models.tiny import IM_END_ID


def hf_greedy(model, prompt: list[int], max_new_tokens: int, *, stop_at_eos: bool = False, **kwargs) -> list[int]:
    """transformers' greedy completion of one prompt on the model's device.

    Exactly ``max_new_tokens`` tokens (EOS masked, as rlserve's ``min_tokens``) unless ``stop_at_eos``.
    """
    ids = torch.tensor([prompt], device=model.device)
    if not stop_at_eos:
        kwargs.setdefault("min_new_tokens", max_new_tokens)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=IM_END_ID, **kwargs)
    return out[0, len(prompt):].tolist()
