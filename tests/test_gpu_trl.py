"""TRL's own client (with vLLM's Python) pushes weights into a CUDA rlserve server over NCCL, on two GPUs:
the server on GPU 1, the trainer (this process) on GPU 0. Whichever TRL release is importable decides the
protocol (<= 1.10: /init_communicator/ + per-tensor broadcasts; >= 1.12: vLLM's weight-transfer API)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two CUDA devices")]

PROMPTS = [[1, 2, 3], [40, 41, 42, 43, 44, 45], list(range(100, 130))]


def test_trl_client_syncs_weights_into_a_gpu_server(tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM

    try:
        from trl.generation.vllm_client import VLLMClient
    except ImportError:
        from trl.extras.vllm_client import VLLMClient
    from hf_utils import hf_greedy
    from rlserve.models.tiny import make_tiny_model
    from server_utils import free_port, running_server

    a = make_tiny_model(tmp_path / "a", "qwen2", seed=1)
    b = make_tiny_model(tmp_path / "b", "qwen2", seed=2)
    model_b = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32).to("cuda:0").eval()
    expected = [hf_greedy(model_b, prompt, 12) for prompt in PROMPTS]
    with running_server(str(a), "--dtype", "float32", "--gpu_memory_utilization", "0.2", device="cuda",
                        env={"CUDA_VISIBLE_DEVICES": "1"}) as server:
        client = VLLMClient(base_url=server.url, group_port=free_port(), connection_timeout=60)
        client.init_communicator(device=0)
        for _ in range(2):  # twice: the second update runs on the established group
            client.update_model_params(model_b)
            client.reset_prefix_cache()
        out = client.generate(PROMPTS, temperature=0.0, max_tokens=12, generation_kwargs={"min_tokens": 12})
        assert out["completion_ids"] == expected
        info = client.session.get(server.url + "/server_info").json()
        assert info["weight_version"] == 2
        client.close_communicator()
