"""The GPU end-to-end harness (tools/trl_e2e/grpo_e2e.py) decides pass/fail with a probe after it pushes the last
optimizer step with the trainer's own sync. The probe must be able to fail: here it runs against a CPU server for the three cases it tells apart."""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

from rlserve import Client
from server_utils import free_port, running_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "trl_e2e"))
import grpo_e2e  # noqa: E402


def test_probe_passes_only_when_the_server_holds_moved_trained_weights(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    push = [lambda: None]  # what the trainer's own sync does: nothing (a sync that never lands), then a real push
    trainer = types.SimpleNamespace(model=model, processing_class=types.SimpleNamespace(pad_token_id=0),
                                    accelerator=types.SimpleNamespace(unwrap_model=lambda m: m),
                                    vllm_generation=types.SimpleNamespace(sync_weights=lambda: push[0]()))
    with running_server(tiny_model, "--dtype", "float32") as server:
        args = argparse.Namespace(url=server.url, model=tiny_model)
        untrained = grpo_e2e._probe(args, trainer)
        assert untrained["logprobs_close"] and not untrained["weights_moved"] and not untrained["equal"]

        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 1e-3)
        not_synced = grpo_e2e._probe(args, trainer)
        assert not not_synced["logprobs_close"] and not not_synced["equal"]

        client = Client(base_url=server.url, group_port=free_port())  # not TRL's fixed default 51216
        client.init_communicator(device="cpu")
        push[0] = lambda: client.update_model_params(model)
        synced = grpo_e2e._probe(args, trainer)
        client.close_communicator()
        assert synced["equal"], synced
        assert synced["server_vs_trained_logprob_max_abs"] < 1e-4
        assert synced["server_weight_version"] == 1 and synced["version_before_push"] == 0 and synced["pushed"]


def test_in_loop_check_needs_trls_per_step_logprob_gap_logged_and_small():
    key = grpo_e2e.IN_LOOP_KEYS[1]
    assert not grpo_e2e._in_loop_check([{"step": 1, "loss": 0.1}])["ok"]  # not logged: nothing checked, not a pass
    assert grpo_e2e._in_loop_check([{key: 1e-6}, {key: 2e-5}, {"loss": 0.0}])["ok"]
    assert not grpo_e2e._in_loop_check([{key: 1e-6}, {key: 0.05}])["ok"]  # one stale step fails the run
