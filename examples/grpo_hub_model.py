"""GRPO on a real hub model with rlserve doing the generation (trainer on one GPU, server on others).

    # terminal 1: the generation server on GPUs 1..N (here: 2 data-parallel replicas)
    CUDA_VISIBLE_DEVICES=1,2 rlserve serve --model Qwen/Qwen2.5-0.5B-Instruct --data_parallel_size 2

    # terminal 2: this trainer on GPU 0
    CUDA_VISIBLE_DEVICES=0 python examples/grpo_hub_model.py --model Qwen/Qwen2.5-0.5B-Instruct

Each step: n completions per prompt from the server (with the sampled tokens' logprobs, the behaviour
policy of the importance ratio), a verifiable reward, group-normalised advantages, one clipped
policy-gradient step, and the new weights pushed into every server worker over NCCL.
"""

from __future__ import annotations

import argparse
import re
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlserve import Client

QUESTIONS = [(f"What is {a} + {b}? Answer with the number only.", a + b) for a in range(3, 60, 7) for b in (4, 9)]


def reward(text: str, answer: int) -> float:
    numbers = re.findall(r"-?\d+", text)
    return 1.0 if numbers and int(numbers[0]) == answer else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-6)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)
    client = Client(base_url=args.server, connection_timeout=600)
    client.init_communicator(device="cuda:0")

    for step in range(args.steps):
        batch = [QUESTIONS[(step * 4 + i) % len(QUESTIONS)] for i in range(4)]
        messages = [[{"role": "user", "content": q}] for q, _ in batch]
        start = time.perf_counter()
        out = client.chat(messages, n=args.n, temperature=1.0, max_tokens=32, logprobs=0)
        gen_s = time.perf_counter() - start
        rewards = torch.tensor([reward(tokenizer.decode(ids, skip_special_tokens=True), batch[i // args.n][1])
                                for i, ids in enumerate(out["completion_ids"])]).view(len(batch), args.n)
        adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
        losses = []
        for i, ids in enumerate(out["completion_ids"]):
            if not ids:
                continue
            prompt = out["prompt_ids"][i // args.n]
            x = torch.tensor([prompt + ids], device="cuda")
            logits = policy(x).logits[0, len(prompt) - 1:-1].float()
            logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids, device="cuda")[:, None]).squeeze(1)
            old = torch.tensor([lp[0] for lp in out["logprobs"][i]], device="cuda")
            ratio = torch.exp(logp - old)
            losses.append(-torch.min(ratio * adv[i], ratio.clamp(0.8, 1.2) * adv[i]).mean())
        loss = torch.stack(losses).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        start = time.perf_counter()
        version = client.update_model_params(policy)
        sync_s = time.perf_counter() - start
        print(f"step {step}: reward {rewards.mean():.3f}  generation {gen_s:.1f}s  sync {sync_s * 1e3:.0f} ms  "
              f"weights v{version}")
    client.close_communicator()


if __name__ == "__main__":
    main()
