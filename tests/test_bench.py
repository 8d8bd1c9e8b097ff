"""The benchmark code on CPU: cold-prefix-cache runs, the sampling modes and their vLLM mapping, ``--against
vllm`` through a fake ``vllm`` package (the real subprocess path, table and JSON), the message when vLLM is
missing, rl-varlen's useful-token accounting, the roofline formula, and the step profiler on the real step."""

from __future__ import annotations

import io
import json
import subprocess
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from rlserve.bench import bench, vllm_baseline
from rlserve.bench.roofline import roofline_seconds
from rlserve.bench.workloads import CPU_TINY, MODES, BenchError, Workload, request_params

REPO = Path(__file__).resolve().parents[1]
ARCH = dict(CPU_TINY, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512)
TINY = Workload("test-tiny", ARCH, num_prompts=3, n=2, prompt_len=20, max_tokens=6, device="cpu")

FAKE_VLLM = '''
import json, os
__version__ = "0.0-fake"

def _log(event, **fields):
    with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
        f.write(json.dumps(dict(fields, event=event)) + "\\n")

class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

class _Completion:
    def __init__(self, token_ids):
        self.token_ids = token_ids

class _Output:
    def __init__(self, outputs):
        self.outputs = outputs

class LLM:
    def __init__(self, **kwargs):
        _log("init", kwargs=kwargs, flashinfer_sampler=os.environ.get("VLLM_USE_FLASHINFER_SAMPLER"))

    def reset_prefix_cache(self):
        _log("reset")

    def generate(self, prompts, sampling_params, use_tqdm=True):
        _log("generate", prompts=[p["prompt_token_ids"] for p in prompts], params=[s.kwargs for s in sampling_params])
        return [_Output([_Completion([7] * s.kwargs["max_tokens"]) for _ in range(s.kwargs["n"])])
                for s in sampling_params]
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch) -> Path:
    """A ``vllm`` package that logs its calls and answers with fixed-length outputs, importable here and in
    the subprocess; returns the log path."""
    package = tmp_path / "fake" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'fake'}:{REPO}")
    log = tmp_path / "vllm-calls.jsonl"
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    return log


def test_workloads_have_the_shapes_of_workloads_md():
    """The architectures are the Qwen2.5 configs WORKLOADS.md names: parameter counts as published."""
    from rlserve.bench.workloads import WORKLOADS

    def billions(a):
        h, layers, inter, vocab = a["hidden_size"], a["num_hidden_layers"], a["intermediate_size"], a["vocab_size"]
        kv = h // a["num_attention_heads"] * a["num_key_value_heads"]
        attention = h * h * 2 + h * kv * 2 + h + 2 * kv  # q, o; k, v; q/k/v biases
        per_layer = attention + 3 * h * inter + 2 * h
        embeddings = vocab * h * (1 if a["tie_word_embeddings"] else 2)
        return (layers * per_layer + embeddings + h) / 1e9

    expected = {"rl-small": 0.49, "rl-medium": 1.54, "rl-7b": 7.62, "rl-32b": 32.76}
    for name, b in expected.items():
        w = WORKLOADS[name]
        assert abs(billions(w.architecture) - b) / b < 0.01, (name, billions(w.architecture))
    assert (WORKLOADS["rl-32b"].num_prompts, WORKLOADS["rl-32b"].n, WORKLOADS["rl-32b"].prompt_len,
            WORKLOADS["rl-32b"].max_tokens) == (16, 8, 256, 1024)


def test_modes_map_to_the_same_sampling_in_rlserve_and_vllm():
    plain, lp0, seeded = (request_params(TINY, MODES[m]) for m in ("plain", "logprobs0", "seeded"))
    assert [p["max_tokens"] for p in plain] == TINY.max_tokens_per_prompt()
    assert all(p["logprobs"] is None and p["seed"] is None for p in plain)
    assert all(p["logprobs"] == 0 and p["seed"] is None for p in lp0)
    assert [p["seed"] for p in seeded] == [0, 1, 2] and all(p["logprobs"] == 0 for p in seeded)
    for p in plain + lp0 + seeded:
        assert p["ignore_eos"] and p["temperature"] == 1.0 and p["top_p"] == 1.0 and p["n"] == TINY.n
        assert vllm_baseline.vllm_sampling_kwargs(p) == dict(p, detokenize=False)
        bench.sampling_params(TINY, MODES["seeded"])  # every field is one of rlserve's SamplingParams too
    with pytest.raises(ValueError, match="top_k"):
        vllm_baseline.vllm_sampling_kwargs(dict(plain[0], top_k=5))


def test_against_vllm_puts_it_in_the_same_table_and_json(tmp_path, fake_vllm, monkeypatch):
    console = Console(file=io.StringIO(), width=200)
    # Below TINY's max_tokens (6), so that the warm-up's cut shows (at 16 it would equal the timed run's lengths).
    monkeypatch.setattr(bench, "WARM_UP_TOKENS", 4)
    from rlserve import LLM
    ours_calls = []
    generate = LLM.generate

    def spy(self, prompts, params=None, detokenize=True):
        ours_calls.append({"prompts": prompts, "params": [dict(n=p.n, max_tokens=p.max_tokens, logprobs=p.logprobs,
                                                               seed=p.seed) for p in params]})
        return generate(self, prompts, params, detokenize=detokenize)
    monkeypatch.setattr(LLM, "generate", spy)
    out = tmp_path / "result.json"
    result = bench.run_bench(TINY, baseline=False, output=str(out), model_root=str(tmp_path / "models"),
                             console=console, against=("vllm",))
    assert json.loads(out.read_text()) == result
    for mode in MODES:
        ours, theirs = result[bench.engine_key("rlserve", mode)], result[bench.engine_key("vllm", mode)]
        assert theirs["generated_tokens"] == ours["generated_tokens"] == TINY.num_generated_tokens()
        assert ours["vs_vllm"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
    assert result["vllm_info"]["version"] == "0.0-fake"
    table = console.file.getvalue()
    assert "vs vLLM" in table and table.count("vllm") >= 3 and "cold prefix cache" in table
    calls = [json.loads(line) for line in fake_vllm.read_text().splitlines()]
    init = calls[0]
    assert init["event"] == "init" and init["flashinfer_sampler"] == "0"
    assert init["kwargs"]["enable_prefix_caching"] is True and init["kwargs"]["dtype"] == "float32"
    assert init["kwargs"]["tensor_parallel_size"] == 1 and init["kwargs"]["enforce_eager"] is False
    assert init["kwargs"]["load_format"] == "auto"  # the CPU model has real weights, as rlserve loads them
    # Per mode: a warm-up on other prompts, a prefix-cache reset, then the timed run on the workload's prompts.
    assert [c["event"] for c in calls[1:]] == ["generate", "reset", "generate"] * len(MODES)
    for i, mode in enumerate(MODES):
        warm, timed = calls[1 + 3 * i], calls[3 + 3 * i]
        assert timed["prompts"] == TINY.prompts()
        assert not set(map(tuple, warm["prompts"])) & set(map(tuple, TINY.prompts()))
        # the whole batch's shape, briefly: what a first use costs is paid before the clock starts, as for rlserve
        assert len(warm["prompts"]) == len(TINY.prompts())
        assert [p["max_tokens"] for p in warm["params"]] == [4] * len(TINY.prompts())
        # rlserve's warm-up is the same: the same prompts, n, logprobs, seeds and lengths
        ours_warm = ours_calls[2 * i]
        assert ours_warm["prompts"] == warm["prompts"]
        assert ours_warm["params"] == [{k: p[k] for k in ("n", "max_tokens", "logprobs", "seed")}
                                       for p in warm["params"]]
        assert timed["params"] == [dict(p, detokenize=False) for p in request_params(TINY, MODES[mode])]


def test_rounds_take_turns_in_fresh_engines_and_report_medians(tmp_path, fake_vllm, monkeypatch):
    """--rounds 2 --against vllm: vLLM first in round 1, rlserve in round 2, each in a fresh process or engine; the
    table's figures are the medians (of two: the mean seconds), each round's ratio beside them."""
    console = Console(file=io.StringIO(), width=200)
    real_round = bench._rlserve_round
    engines = []

    def logged_round(*args, **kwargs):
        with open(fake_vllm, "a") as f:
            f.write(json.dumps({"event": "rlserve"}) + "\n")
        runs = real_round(*args, **kwargs)
        engines.append(runs)
        return runs
    monkeypatch.setattr(bench, "_rlserve_round", logged_round)
    result = bench.run_bench(TINY, baseline=False, modes=("seeded",), output=str(tmp_path / "r.json"),
                             model_root=str(tmp_path / "models"), console=console, against=("vllm",), rounds=2)
    events = [json.loads(line)["event"] for line in fake_vllm.read_text().splitlines()]
    assert [e for e in events if e in ("init", "rlserve")] == ["init", "rlserve", "rlserve", "init"]
    assert [r["first"] for r in result["rounds"]] == ["vllm", "rlserve"]
    assert result["startup_seconds"] > 0 and result["engine"]["device"] == "cpu"
    ours, theirs = result[bench.engine_key("rlserve", "seeded")], result[bench.engine_key("vllm", "seeded")]
    assert ours["rounds_tokens_per_s"] == [runs["seeded"]["tokens_per_s"] for runs in engines]
    assert ours["seconds"] == pytest.approx(sum(runs["seeded"]["seconds"] for runs in engines) / 2)
    assert ours["tokens_per_s"] == pytest.approx(TINY.num_generated_tokens() / ours["seconds"])
    assert len(theirs["rounds_tokens_per_s"]) == 2
    assert ours["vs_vllm"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
    for r, a, b in zip(result["rounds"], ours["rounds_tokens_per_s"], theirs["rounds_tokens_per_s"]):
        assert r["vs_vllm"]["seeded"] == pytest.approx(a / b)
    assert "medians of 2 rounds" in console.file.getvalue()


def test_median_run_of_an_even_count_is_the_mean_of_the_middle_two():
    runs = [{"seconds": s, "generated_tokens": 12, "tokens_per_s": 12 / s} for s in (4.0, 1.0, 3.0, 2.0)]
    median = bench.median_run(runs)
    assert median["seconds"] == 2.5 and median["tokens_per_s"] == 12 / 2.5
    assert median["rounds_tokens_per_s"] == [3.0, 12.0, 4.0, 6.0]
    assert bench.median_run(runs[:1]) is runs[0]


def test_against_vllm_without_vllm_says_so_before_measuring(monkeypatch, capsys):
    from rlserve import cli
    monkeypatch.setattr(vllm_baseline.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["bench", "--workload", "cpu-tiny", "--against", "vllm"]) == 2
    assert "vLLM is not importable" in capsys.readouterr().err
    assert cli.main(["bench", "--workload", "cpu-tiny", "--against", "vllm", "--through_server"]) == 2
    assert "does not combine with --through_server" in capsys.readouterr().err
    assert cli.main(["bench", "--workload", "cpu-tiny", "--rounds", "0"]) == 2
    assert cli.main(["bench", "--workload", "cpu-tiny", "--rounds", "2", "--through_server"]) == 2
    assert capsys.readouterr().err.count("--rounds must be at least 1") == 2
    for engine_flag in (["--async_scheduling", "false"], ["--num_scheduler_steps", "4"],
                        ["--shared_prefix_min_tokens", "0"]):  # the server's: --server_args
        assert cli.main(["bench", "--workload", "cpu-tiny", "--through_server", *engine_flag]) == 2
        assert "--shared_prefix_min_tokens in --server_args" in capsys.readouterr().err
    with pytest.raises(BenchError, match="unknown mode"):
        bench.run_bench(TINY, modes=("greedy",))


def test_each_timed_run_starts_on_a_cold_prefix_cache(tmp_path):
    """The warm-up uses other prompts and the cache is reset: a run's prefix-cache hits are its own (the n
    samples of a prompt sharing it) and the same whatever ran before."""
    from rlserve import LLM
    model_dir, _ = bench.prepare_model(TINY, tmp_path, bench.torch.device("cpu"))
    llm = LLM(str(model_dir), device="cpu", dtype="float32")
    first = bench.run_rlserve(llm, TINY, MODES["seeded"])
    again = bench.run_rlserve(llm, TINY, MODES["seeded"])
    assert first["prefix_cache_hit_tokens"] == again["prefix_cache_hit_tokens"]
    fresh = LLM(str(model_dir), device="cpu", dtype="float32")
    fresh.generate(TINY.prompts(), bench.sampling_params(TINY, MODES["seeded"]), detokenize=False)
    assert first["prefix_cache_hit_tokens"] == fresh.stats()["prefix_cache_hit_tokens"]


def test_varlen_transformers_counts_useful_and_generated_tokens(tmp_path):
    from rlserve.bench.baselines import hf_generate_throughput, load_hf_model
    model_dir, _ = bench.prepare_model(TINY, tmp_path, bench.torch.device("cpu"))
    hf = load_hf_model(model_dir, bench.torch.float32, bench.torch.device("cpu"), False)
    r = hf_generate_throughput(hf, TINY.prompts(), 2, [2, 5, 3])
    assert r["useful_tokens"] == (2 + 5 + 3) * 2 and r["generated_tokens"] == 5 * 3 * 2
    assert r["tokens_per_s"] == pytest.approx(r["useful_tokens"] / r["seconds"])
    assert r["generated_tokens_per_s"] == pytest.approx(r["generated_tokens"] / r["seconds"])


def test_roofline_charges_the_shared_prompt_kv_once_per_step():
    arch = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=16, vocab_size=10, tie_word_embeddings=True)
    r = roofline_seconds(arch, prompt_len=4, num_prompts=2, n=3, max_tokens=[2, 1], bytes_per_param=2,
                         bandwidth=1.0, flops=1e30)
    params = 8 * (2 + 2) * 4 + 2 * 4 * 8 + 3 * 8 * 16 + 10 * 8
    kv = 2 * 1 * 1 * 4 * 2  # K and V, one layer, one KV head, head_dim 4, 2 bytes
    # step 0: both prompts run (3 samples each); step 1: only the first, each sample has one token of its own
    want = 2 * params * 2 + (2 * 4 + 0) * kv + (1 * 4 + 3 * 1) * kv  # two steps of 2-byte weights
    assert r["params"] == params and r["bytes"] == want
    assert r["bytes_if_each_sequence_reads_its_prompt"] == 2 * params * 2 + 6 * 4 * kv + (3 * 4 + 3 * 1) * kv
    assert r["floor_seconds"] == want
    untied = roofline_seconds(dict(arch, tie_word_embeddings=False), 4, 2, 3, [2, 1], 2, 1.0, 1e30)
    assert untied["params"] == params + 80 and untied["matmul_params"] == params  # the input table is gathered


def test_profiler_times_the_engines_own_step(tmp_path):
    from rlserve.bench.profile_step import profile
    from rlserve.engine.core import EngineCore
    report = profile(replace(TINY, max_tokens=40), steps=4, mode_name="seeded", output=str(tmp_path / "p.json"),
                     device="cpu", model_root=str(tmp_path))
    phases = report["ms_per_step"]
    for name in ("schedule (host)", "build inputs (host)", "model (eager)", "LM head", "sampler (+logprobs)",
                 "device->host sync", "apply tokens (host)", "rest of the step (host)"):
        assert name in phases, phases
    assert sum(phases.values()) == pytest.approx(report["total_ms_per_step"])
    assert report["mean_batch"] == TINY.num_sequences
    assert "step" in vars(EngineCore)  # the hooks went on instances; the classes are untouched


def test_through_server_passes_server_args_and_times_every_token(tmp_path, monkeypatch):
    """`rlserve bench --through_server --server_args ...` (how Ray replicas are timed against local ones): the flags
    reach `rlserve serve`, the result records them, and each timed answer carries every generated token."""
    from rlserve import cli
    from rlserve.bench import server_bench
    monkeypatch.setattr(server_bench, "get_workload", lambda name: TINY)
    monkeypatch.setattr(server_bench, "codec_bench", lambda: {})
    started = []
    start = server_bench.start_bench_server
    monkeypatch.setattr(server_bench, "start_bench_server",
                        lambda *args: started.append(args[-1]) or start(*args))
    run = server_bench.run_server_bench
    monkeypatch.setattr(server_bench, "run_server_bench", lambda *a, **k: run(*a, **k, model_root=str(tmp_path)))
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--workload", "cpu-tiny", "--through_server", "--repeats", "2", "--server_args",
                     "--max_num_seqs 4 --seed 3", "--output", str(out)]) == 0
    assert started == [["--max_num_seqs", "4", "--seed", "3"]]
    result = json.loads(out.read_text())
    assert result["server_args"] == ["--max_num_seqs", "4", "--seed", "3"]
    for key in ("offline", "server", "server_binary", "server_arrays"):
        assert result[key]["generated_tokens"] == TINY.num_generated_tokens()
    assert [(result[k]["response_format"], result[k]["client_arrays"]) for k in
            ("server", "server_binary", "server_arrays")] == [("json", False), ("binary", False), ("binary", True)]
    for key in ("server", "server_binary", "server_arrays"):  # the wall time split by the server's Server-Timing
        parts = result[key]["parts"]
        assert 0 < parts["server_generate_s"] and 0 <= parts["server_build_s"] and 0 < parts["client_decode_s"]
        # the server's own time and the client's decoding fit inside the wall time: what is left is the HTTP part
        assert 0 < parts["http_and_rest_s"] < result[key]["seconds"]
        # each replica's steps during the run: some, and their time inside the server's generate phase
        (replica,) = parts["replicas"]
        assert replica["replica"] == 0 and replica["steps"] >= TINY.max_tokens
        assert 0 < replica["step_s"] <= parts["server_generate_s"] and replica["gc_s"] >= 0
        assert sorted(run["seconds"] for run in result[key]["runs"]) == result[key]["all_seconds"]
    # the offline figure beside them runs the server's engine, as `serve` parsed --server_args
    assert result["offline_engine"] == {"async_scheduling": False, "num_scheduler_steps": 1, "max_num_seqs": 4,
                                        "seed": 3}


def test_codec_bench_times_every_layout_on_the_same_answer():
    from rlserve.bench.server_bench import codec_bench
    result = codec_bench(num_sequences=16, length=8, repeats=1)
    assert result["binary"]["bytes"] < result["json"]["bytes"]
    for layout in ("json", "binary", "arrays"):  # arrays: the binary body, decoded to numpy arrays
        r = result[layout]
        assert r["server_encode_s"] > 0 and r["client_decode_s"] > 0


def test_server_timing_header_is_parsed_as_seconds():
    from rlserve.bench.server_bench import server_timing
    assert server_timing("generate;dur=1234.5, build;dur=20") == {"generate": 1.2345, "build": 0.02}
    assert server_timing('db;desc="x";dur=3') == {"db": 0.003}
    assert server_timing(None) == {} and server_timing("miss") == {}
    assert server_timing("cdn;dur=abc, generate;dur=5") == {"generate": 0.005}  # a proxy's odd metric is skipped


def test_async_scheduling_flag_reaches_the_engine_and_the_result(tmp_path, monkeypatch):
    from rlserve import cli
    seen = {}
    run = bench.run_bench

    def run_tiny(name, **kwargs):
        seen.update(kwargs["engine_kwargs"])
        return run(TINY, **dict(kwargs, model_root=str(tmp_path), baseline=False))

    monkeypatch.setattr(bench, "run_bench", run_tiny)
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--workload", "cpu-tiny", "--modes", "seeded", "--async_scheduling",
                     "--output", str(out)]) == 0
    assert seen == {"async_scheduling": True}
    result = json.loads(out.read_text())
    assert result["engine_kwargs"] == {"async_scheduling": True}
    assert result["engine"]["async_scheduling"] is True  # as run
    assert result["rlserve_seeded"]["generated_tokens"] == TINY.num_generated_tokens()
    # unset: the engine's own default, recorded as run (off on this CPU); `false` reaches the engine as False
    assert cli.main(["bench", "--workload", "cpu-tiny", "--modes", "seeded", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["engine"]["async_scheduling"] is False
    seen.clear()
    assert cli.main(["bench", "--workload", "cpu-tiny", "--modes", "seeded", "--async_scheduling", "false",
                     "--output", str(out)]) == 0
    assert seen == {"async_scheduling": False}


def test_num_prompts_runs_the_workload_with_fewer_prompts(tmp_path, monkeypatch, capsys):
    """`--num_prompts` (what one replica of DP=2 does with a split batch): the same shape with that many prompts,
    the first ones of the workload's seed; nonsense is refused before anything starts."""
    from rlserve import cli
    from rlserve.bench import workloads
    monkeypatch.setitem(workloads.WORKLOADS, "cpu-tiny", TINY)
    run = bench.run_bench
    monkeypatch.setattr(bench, "run_bench", lambda w, **k: run(w, **dict(k, model_root=str(tmp_path))))
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--workload", "cpu-tiny", "--modes", "plain", "--no_baseline", "--num_prompts", "2",
                     "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["sequences"] == 2 * TINY.n
    assert result["rlserve"]["generated_tokens"] == 2 * TINY.n * TINY.max_tokens
    assert replace(TINY, num_prompts=2).prompts() == TINY.prompts()[:2]
    assert cli.main(["bench", "--workload", "cpu-tiny", "--num_prompts", "0"]) == 2
    assert "--num_prompts must be at least 1" in capsys.readouterr().err


def test_the_offline_engine_beside_a_server_reads_the_server_flags_as_serve_does():
    """`--async-scheduling`, `--async_scheduling=true`, `--async_scheduling false`: what the server runs, the
    offline figure it is compared with runs too."""
    import torch

    from rlserve.bench.server_bench import bench_server_args
    from rlserve.cli import serve_engine_config

    def config(*extra):
        return serve_engine_config(["--model", "m", *bench_server_args(torch.device("cpu"), True, 1, 1, list(extra))])

    assert config().async_scheduling is None and not config().resolved_async_scheduling()  # unset: off on CPU
    assert config().dtype == "bfloat16" and config().load_format == "dummy"
    for flags in (["--async-scheduling"], ["--async_scheduling"], ["--async_scheduling=true"]):
        assert config(*flags).async_scheduling, flags
    assert config("--async_scheduling", "false").async_scheduling is False
    assert config("--max-num-seqs", "8", "--seed", "5").max_num_seqs == 8


def test_the_recorded_commit_says_when_the_tree_differs_from_it(tmp_path, monkeypatch):
    """A tree copied beside a stale .git (the device machine's checkout) must not be recorded as that commit."""
    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True, timeout=30)

    monkeypatch.delenv("RLSERVE_COMMIT", raising=False)
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=30).stdout.strip()
    (tmp_path / "new.py").write_text("untracked\n")  # untracked files (results, wheels) leave it clean
    assert bench.git_commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert bench.git_commit(tmp_path) == f"{head}-dirty"
    monkeypatch.setenv("RLSERVE_COMMIT", "abc1234")
    assert bench.git_commit(tmp_path) == "abc1234"
