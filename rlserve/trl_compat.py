"""Run TRL's trainers against rlserve from an environment without vLLM.

TRL's trainers (``use_vllm=True, vllm_mode="server"``) build TRL's own ``VLLMClient``, which imports vLLM for
its weight-sync classes. With vLLM installed, nothing is needed: ``rlserve serve`` speaks both of TRL's
protocols. Without it, one line before the trainer is built makes TRL use ``rlserve.Client`` instead::

    import rlserve.trl_compat; rlserve.trl_compat.use_rlserve_client()

It patches the TRL modules that hold the client class (``trl.generation.vllm_generation`` from TRL 1.x, the
trainers' own modules in older releases) and their vLLM availability check, which only decides whether the
server mode may be used.
"""

from __future__ import annotations

import importlib

from rlserve.client.client import Client

_MODULES = ("trl.generation.vllm_generation", "trl.trainer.grpo_trainer", "trl.trainer.online_dpo_trainer",
            "trl.trainer.rloo_trainer", "trl.trainer.gkd_trainer", "trl.experimental.gold.gold_trainer")


def use_rlserve_client() -> list[str]:
    """Make TRL's trainers build ``rlserve.Client``; returns the modules patched."""
    patched = []
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # not in this TRL release (or needs an extra that is not installed)
            continue
        if hasattr(module, "VLLMClient"):
            module.VLLMClient = Client
            patched.append(name)
        if hasattr(module, "is_vllm_available"):
            module.is_vllm_available = lambda *args, **kwargs: True
    if not patched:
        raise RuntimeError("no TRL module holding VLLMClient was found: is trl installed?")
    return patched
