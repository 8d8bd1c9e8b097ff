#!/usr/bin/env python3
"""End-to-end check: an UNCHANGED TRL GRPOTrainer (use_vllm=True, vllm_mode="server") against `rlserve serve`.

Two GPUs: rlserve on --server-gpu (default 1), the trainer on --trainer-gpu (default 0). Every phase runs in its own
child process with a hard timeout, against a freshly started server (a failed weight-sync rendezvous can leave the
server's group port bound), and the results go to <out>/results.json plus a printed table.

Phases
  http            the TRL release's own VLLMClient, called the way its trainer calls it (no weight sync)
  grpo-unchanged  GRPOTrainer exactly as a TRL user writes it, 3 steps, then the probe below. This is the phase that
                  must pass (what the runs so far showed: tools/trl_e2e/README.md).
  grpo-control    the same trainer, with trl.generation.vllm_generation.VLLMClient replaced by a thin adapter over
                  rlserve.Client (the README's migration path), to show the rest of the loop works: weight sync over
                  NCCL GPU0 -> GPU1 with rlserve's own protocol, 3 optimizer steps, server weight version advancing.

Each grpo phase is ok only when three checks pass. In the loop: TRL's own per-step gap between the trainer's and the
server's logprobs of the sampled tokens (sampling/sampling_logp_difference/max) stays within IN_LOOP_TOL, and the
server's weight version equals the number of steps (one sync per step). After training, the probe (_probe): the
trainer's own sync pushes its last optimizer step (TRL syncs before each generation, so the last step has not
reached the server when train() returns), then the server's greedy tokens on a fixed prompt (generated from once
before the push, so stale cached blocks would show) equal the trained model's (transformers, same weights), the
server's logprobs of them match the trained model's within PROBE_LOGPROB_TOL and differ from the initial model's.

Usage (see RUNBOOK.md):
  python grpo_e2e.py --trl-path site-trl-1.10.0 --out e2e-1.10
  python grpo_e2e.py --trl-path site-trl-1.16.0 --out e2e-1.16 --phases http,grpo-unchanged,grpo-control
  CPU dry run (control only meaningful): --device cpu
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_health(url: str, timeout: float, proc=None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:  # it exited: no point waiting
            return False
        try:
            with urllib.request.urlopen(url + "/health/", timeout=5) as r:
                if r.status == 200:
                    return True
        except Exception:
            pass
        time.sleep(1.0)
    return False


def http_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def tail(path: Path, n: int = 40) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except FileNotFoundError:
        return []


def trl_version(trl_path: str) -> str:
    code = "import trl; print(trl.__version__)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [trl_path, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()


# ------------------------------------------------------------------------------------------------ model
def make_model(out: Path) -> Path:
    """A random Qwen2 (hidden 256, 4 layers, GQA 4/2 heads) + rlserve's byte-level HF tokenizer (tokenizers library,
    saved with save_pretrained, chat template included): no download needed."""
    from rlserve.models.tiny import make_tiny_model

    path = out / "tiny-qwen2"
    if not (path / "model.safetensors").exists():
        make_tiny_model(path, "qwen2", seed=0, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=512, max_position_embeddings=1024,
                        initializer_range=0.02)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token is not None and tok.eos_token is not None and tok.chat_template
    return path


# ------------------------------------------------------------------------------------------------ server
class Server:
    def __init__(self, args, model_dir: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.repo), env.get("PYTHONPATH")]))
        cmd = [args.server_python, "-m", "rlserve.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "float32", "--max_model_len", "512", "--log_level", "info"]
        if args.device == "cpu":
            cmd += ["--device", "cpu"]
            env.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            cmd += ["--gpu_memory_utilization", "0.3"]
            env["CUDA_VISIBLE_DEVICES"] = str(args.server_gpu)
        cmd += args.server_arg
        self.log = log
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if not wait_health(self.url, args.server_start_timeout, self.proc):
            self.stop()
            raise RuntimeError("rlserve did not become healthy; log tail:\n" + "\n".join(tail(log)))

    def info(self) -> dict:
        try:
            return http_json(self.url + "/server_info/")
        except Exception as e:
            return {"error": str(e)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# ------------------------------------------------------------------------------------------------ child phases
def _trl_client_cls():
    try:
        from trl.generation.vllm_client import VLLMClient
    except ImportError:
        from trl.extras.vllm_client import VLLMClient
    return VLLMClient


def phase_http(a) -> dict:
    """The release's own VLLMClient, with the calls (and arguments) its GRPO trainer makes, minus weight sync."""
    import trl

    VLLMClient = _trl_client_cls()
    c = VLLMClient(base_url=a.url, connection_timeout=30)
    res = {"trl": trl.__version__}
    ids = [[72, 101, 108, 108, 111], [84, 104, 101, 32, 115, 107, 121]]  # byte tokenizer: ids == bytes
    kw = dict(n=4, repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=16, logprobs=0,
              structured_outputs_regex=None, generation_kwargs={})
    try:
        out = c.generate(prompts=ids, **kw)
        res["generate"] = {"ok": len(out["completion_ids"]) == 8 and all(
            [t[0] for t in lt] == list(ci) for lt, ci in zip(out["logprob_token_ids"], out["completion_ids"]))}
    except Exception as e:
        res["generate"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    try:
        c.reset_prefix_cache()
        res["reset_prefix_cache"] = {"ok": True}
    except Exception as e:
        res["reset_prefix_cache"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    if hasattr(c, "get_server_info"):
        try:
            c.get_server_info()["weight_transfer_config"]
            res["get_server_info"] = {"ok": True}
        except Exception as e:
            res["get_server_info"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    return res


def _dataset():
    from datasets import Dataset

    prompts = ["Hello", "The sky is", "Once upon a time", "2 + 2 =", "My name is", "Paris is", "I like", "Why"]
    return Dataset.from_dict({"prompt": prompts * 4})


def reward_lowercase(completions, **kwargs):
    """The share of lowercase letters in a completion (the demo's reward). It differs between the samples of a
    random model, so every group has non-zero advantages and each step really moves the weights; a reward that
    was constant within groups (all completions at max length) made the earlier runs' gradients zero."""
    return [sum(ch.islower() for ch in c) / max(1, len(c)) for c in completions]


def _grpo_config(a):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(Path(a.out) / f"trainer-{a.phase}"), max_steps=3, per_device_train_batch_size=4,
        gradient_accumulation_steps=1, num_generations=4, max_completion_length=16, learning_rate=1e-3,
        logging_steps=1, report_to="none", save_strategy="no", bf16=False, seed=0, temperature=1.0,
        use_cpu=(a.device == "cpu"), dataloader_num_workers=0,
        use_vllm=True, vllm_mode="server", vllm_server_base_url=a.url, vllm_server_timeout=60,
        vllm_group_port=a.group_port,
    )


def _train(a) -> dict:
    import torch
    from trl import GRPOTrainer

    trainer = GRPOTrainer(model=a.model, reward_funcs=reward_lowercase, args=_grpo_config(a), train_dataset=_dataset())
    t = time.monotonic()
    out = trainer.train()
    logs = [{k: v for k, v in h.items() if k in ("step", "loss", "reward", "rewards/reward_lowercase/mean",
                                                   "completions/mean_length", *IN_LOOP_KEYS)}
            for h in trainer.state.log_history]
    probe = _probe(a, trainer)
    in_loop = _in_loop_check(logs)
    # TRL syncs before each step's generation: one weight version per step before the probe's own push
    syncs_ok = probe["version_before_push"] == trainer.state.global_step and probe["pushed"]
    return {"ok": probe["equal"] and in_loop["ok"] and syncs_ok, "global_step": trainer.state.global_step,
            "train_loss": out.training_loss, "seconds": round(time.monotonic() - t, 1), "log": logs,
            "cuda": torch.cuda.is_available(), "in_loop": in_loop, "syncs_ok": syncs_ok, "probe": probe}


PROBE_LOGPROB_TOL = 1e-4  # float32 on both sides, different kernels (2 x H200 runs: <= 1e-6)
# TRL's own per-step check of each in-loop sync (with vllm_importance_sampling_correction, its default): the largest
# |trainer logprob - server logprob| over the step's completion tokens, the trainer's forward on the weights it
# had just pushed. Looser than the probe: batched, padded sequences on the trainer's side.
IN_LOOP_KEYS = ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max")
IN_LOOP_TOL = 1e-3


def _in_loop_check(logs: list[dict]) -> dict:
    """Every step's logged sampling_logp_difference/max within IN_LOOP_TOL (and at least one logged)."""
    values = [entry[IN_LOOP_KEYS[1]] for entry in logs if IN_LOOP_KEYS[1] in entry]
    return {"ok": bool(values) and max(values) <= IN_LOOP_TOL, "max_per_step": values, "tolerance": IN_LOOP_TOL}


def _probe(a, trainer) -> dict:
    """After the last sync the server must hold the trained weights, which must differ from the initial ones.

    Greedy tokens alone cannot tell (a random tiny model repeats one token whatever small step it took), so the
    probe also compares the server's logprobs of its greedy tokens with log-softmax under the trained model
    (must agree within PROBE_LOGPROB_TOL) and under the initial model from disk (must differ by more than ten
    times what server and trainer differ by). ok = tokens equal, logprobs close, weights moved."""
    import torch
    from transformers import AutoModelForCausalLM

    # Longer than two KV blocks, and generated from once before the push: the push must drop its cached blocks.
    probe = list(b"Hello, world! The quick brown fox jumps over the lazy dog.")
    n = 24
    version_before = _server_greedy(a.url, probe, n)["weight_version"]
    # The trainer syncs before each generation, so its last optimizer step has not reached the server yet: push
    # it with the trainer's own sync (TRL 1.x's VLLMGeneration; older releases named it _move_model_to_vllm).
    generation = getattr(trainer, "vllm_generation", None)
    generation.sync_weights() if generation is not None else trainer._move_model_to_vllm()
    server = _server_greedy(a.url, probe, n)
    tokens = server["completion_ids"][0]
    server_lp = torch.tensor([row[0] for row in server["logprobs"][0]], dtype=torch.float64)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    ids = torch.tensor([probe], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=trainer.processing_class.pad_token_id)
    theirs = out[0, len(probe):].tolist()
    initial = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(model.device).eval()
    eos = model.generation_config.eos_token_id
    banned = [eos] if isinstance(eos, int) else list(eos or [])  # min_tokens bans them: processed logprobs
    trained_lp = _token_logprobs(model, probe, tokens, banned)
    initial_lp = _token_logprobs(initial, probe, tokens, banned)
    server_vs_trained = float((server_lp - trained_lp).abs().max())
    trained_vs_initial = float((trained_lp - initial_lp).abs().max())
    close = server_vs_trained <= PROBE_LOGPROB_TOL
    moved = trained_vs_initial > 10 * max(server_vs_trained, 1e-6)
    return {"equal": tokens == theirs and close and moved, "tokens_equal": tokens == theirs,
            "server_vs_trained_logprob_max_abs": server_vs_trained,
            "trained_vs_initial_logprob_max_abs": trained_vs_initial, "logprobs_close": close, "weights_moved": moved,
            "server": tokens, "trainer": theirs, "server_weight_version": server.get("weight_version"),
            "version_before_push": version_before, "pushed": server.get("weight_version") == version_before + 1}


def _server_greedy(url: str, prompt: list[int], n: int) -> dict:
    """The server's greedy ``n`` tokens after ``prompt``, with their logprobs (min_tokens: no early EOS)."""
    body = json.dumps({"prompts": [prompt], "temperature": 0.0, "max_tokens": n, "logprobs": 0,
                       "generation_kwargs": {"min_tokens": n}}).encode()
    request = urllib.request.Request(url + "/generate/", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def _token_logprobs(model, prompt: list[int], tokens: list[int], banned: list[int]):
    """log p(tokens[i] | prompt + tokens[:i]) under ``model`` with the ``banned`` ids masked out (what the server's
    processed logprobs are under min_tokens), float32 forward, float64 result on the CPU."""
    import torch

    ids = torch.tensor([prompt + tokens], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    logits[:, banned] = float("-inf")
    picked = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens, device=model.device)[:, None])
    return picked.squeeze(1).double().cpu()


def phase_grpo_unchanged(a) -> dict:
    import faulthandler

    faulthandler.dump_traceback_later(max(a.timeout - 30, 10), exit=False)  # show where it blocks, before the kill
    try:
        return _train(a)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:600], "traceback": traceback.format_exc()[-2500:]}


def _rlserve_adapter():
    """rlserve.Client with the extra keyword arguments / methods TRL's VLLMGeneration uses (1.0-1.16)."""
    import contextlib

    import torch
    from rlserve import Client

    class RlserveVLLMClient(Client):
        def generate(self, prompts, images=None, features=None, **kw):
            if images is not None and any(i is not None for i in images) or features is not None:
                raise NotImplementedError("images are not supported by rlserve")
            return super().generate(prompts, **kw)

        def init_communicator(self, device=0, timeout_s: float = 120.0):
            dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
            return super().init_communicator(device="cpu" if dev.type == "cpu" else dev, timeout_s=timeout_s)

        def update_named_params(self, metadata, named_params):  # TRL >= 1.12: one bucketed update
            self.update_weights(named_params)

        @contextlib.contextmanager
        def weight_update(self):
            yield

        def get_server_info(self):  # TRL 1.16 reads these two keys
            return {"weight_transfer_config": {"backend": "rlserve"}, "model_config": {"logprobs_mode": "processed_logprobs"},
                    "rlserve": self.server_info()}

    return RlserveVLLMClient


def phase_grpo_control(a) -> dict:
    import trl.generation.vllm_generation as vg

    vg.VLLMClient = _rlserve_adapter()  # the only change: TRL's client class -> rlserve's
    try:
        return _train(a)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:600], "traceback": traceback.format_exc()[-2500:]}


PHASES = {"http": phase_http, "grpo-unchanged": phase_grpo_unchanged, "grpo-control": phase_grpo_control}
DEFAULT_TIMEOUTS = {"http": 180, "grpo-unchanged": 420, "grpo-control": 600}


def child_main(a) -> None:
    res = PHASES[a.phase](a)
    Path(a.result).write_text(json.dumps(res, indent=1, default=str))


# ------------------------------------------------------------------------------------------------ driver
def run_phase(args, phase: str, model_dir: Path, out: Path) -> dict:
    log_srv, log_tr, result = out / f"{phase}.server.log", out / f"{phase}.trainer.log", out / f"{phase}.json"
    timeout = args.timeout or DEFAULT_TIMEOUTS[phase]
    t0 = time.monotonic()
    try:
        server = Server(args, model_dir, log_srv)
    except Exception as e:
        return {"phase": phase, "status": "server-failed", "error": str(e)[:1000]}
    group_port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.trl_path, str(args.repo), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env["CUDA_VISIBLE_DEVICES"] = str(args.trainer_gpu)
        # As `torchrun`/`accelerate launch` start a trainer: accelerate's device is then "cuda:0". In a plain
        # single process it is "cuda" (no index), and vLLM 0.26's PyNcclCommunicator, which TRL <= 1.10's client
        # builds with that device, fails its own warm-up ("created to work on cuda, but the input tensor is on
        # cuda:0") whatever the server -- a TRL/vLLM matter, not the server's.
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
    cmd = [args.trainer_python, str(HERE), "_child", "--phase", phase, "--url", server.url, "--model", str(model_dir),
           "--out", str(out), "--result", str(result), "--group-port", str(group_port), "--device", args.device,
           "--timeout", str(timeout)]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log_tr, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    status = "done"
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        status = "timeout"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    info = server.info()
    server.stop()
    res = {"phase": phase, "status": status, "returncode": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
           "server_weight_version": info.get("weight_version"), "server_counters": info.get("counters"),
           # launches of several decode steps (--num_scheduler_steps): the flag was in effect, not only passed
           "server_multi_step_launches": sum(r.get("num_multi_step_launches", 0) for r in info.get("replicas", []))}
    if result.exists():
        res["result"] = json.loads(result.read_text())
    res["trainer_log_tail"] = tail(log_tr, 25)
    res["server_log_tail"] = [l for l in tail(log_srv, 200) if " 200 " not in l][-15:]
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        p = argparse.ArgumentParser()
        for k in ("--phase", "--url", "--model", "--out", "--result", "--device"):
            p.add_argument(k, required=True)
        p.add_argument("--group-port", type=int, required=True)
        p.add_argument("--timeout", type=int, required=True)
        child_main(p.parse_args(sys.argv[2:]))
        return

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl-path", required=True, help="folder holding the trl package of the release to test")
    p.add_argument("--out", required=True)
    p.add_argument("--phases", default="http,grpo-unchanged,grpo-control")
    p.add_argument("--repo", default=os.getcwd(), help="rlserve checkout holding the rlserve package (default: cwd)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--server-gpu", type=int, default=1)
    p.add_argument("--trainer-gpu", type=int, default=0)
    p.add_argument("--server-python", default=sys.executable)
    p.add_argument("--trainer-python", default=sys.executable)
    p.add_argument("--server-start-timeout", type=float, default=300)
    p.add_argument("--server-arg", action="append", default=[],
                   help="one more argument for rlserve serve (repeatable), e.g. --server-arg=--async_scheduling")
    p.add_argument("--timeout", type=int, default=0, help="per-phase limit in seconds (0: phase default)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, args.repo)
    model_dir = make_model(out)
    summary = {"trl": trl_version(args.trl_path), "device": args.device, "server_args": args.server_arg,
               "phases": []}
    for phase in args.phases.split(","):
        print(f"== {phase} ...", flush=True)
        r = run_phase(args, phase, model_dir, out)
        summary["phases"].append(r)
        ok = (r.get("result") or {}).get("ok")
        err = (r.get("result") or {}).get("error") or r.get("error") or ""
        print(f"   status={r['status']} ok={ok} seconds={r.get('seconds')} weight_version={r.get('server_weight_version')}"
              f" {err[:200]}", flush=True)
        if phase == "http":
            print("   " + json.dumps(r.get("result"))[:600], flush=True)
        (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
