"""Compare grammar libraries for structured outputs: llguidance, xgrammar, outlines-core (CPU).

For each tokenizer (the byte-level tiny one, and a 32000-token byte-level BPE trained here on the Python
standard library's sources, no network) and each grammar (a regex, a small JSON schema, a choice list) it
measures:

- setup: wrapping the tokenizer (once per engine);
- compile: turning the grammar into the library's compiled form (once per distinct grammar, cached);
- new state: a fresh per-sequence state from the compiled grammar, and copying a state (the fork of n samples);
- per token: ``fill the next-token bitmask`` + ``accept the token``, for one sequence, averaged over a valid
  completion (its canonical tokenization), including the final mask where only EOS is allowed.

Run: ``python tools/structured_libs.py [--repeat 20]``. Libraries that are not installed are skipped.
A developer tool, not part of the package: a server never needs xgrammar or outlines-core.
The results are recorded in notes/structured_outputs.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

REGEX = r"\d{1,3}(\.\d+)?"
REGEX_SAMPLE = "127.0625"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "score", "tags", "active"],
    "additionalProperties": False,
}
SCHEMA_SAMPLE = '{"name": "Ada Lovelace", "age": 36, "score": 9.75, "tags": ["math", "engines"], "active": true}'
CHOICES = ["positive", "negative", "neutral", "mixed feelings"]
CHOICE_SAMPLE = "mixed feelings"


# -- tokenizers ---------------------------------------------------------------------------------------
def bpe_tokenizer(path: str = "/tmp/rlserve_bpe32k"):
    """A 32000-token byte-level BPE trained on the standard library's .py files (about 15 s, cached)."""
    from transformers import PreTrainedTokenizerFast
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = os.path.dirname(os.__file__)

    def texts():
        total = 0
        for dirpath, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                if name.endswith(".py"):
                    try:
                        text = open(os.path.join(dirpath, name), encoding="utf-8").read()
                    except (UnicodeDecodeError, OSError):
                        continue
                    total += len(text)
                    yield text
                    if total > 40e6:
                        return

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.save_pretrained(path)
    return tok


def byte_level_vocab(tokenizer) -> dict[int, bytes]:
    """id -> raw bytes of every non-special token of a byte-level BPE tokenizer."""
    from rlserve.models.tiny import _byte_chars
    inverse = {ch: b for b, ch in enumerate(_byte_chars())}
    special = set(tokenizer.all_special_ids)
    out = {}
    for token, i in tokenizer.get_vocab().items():
        if i in special:
            continue
        out[i] = bytes(inverse[ch] for ch in token)
    return out


# -- timing helpers -----------------------------------------------------------------------------------
def timed(fn, repeat: int = 1):
    """(result of the last call, best seconds of ``repeat`` calls: on a shared machine the best is the least
    disturbed measure of the cost itself)."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, min(times)


class Lib:
    name = ""

    def setup(self, tokenizer, eos: list[int]): ...
    def compile(self, kind: str, spec): ...
    def new_state(self, compiled): ...
    def copy(self, state): ...
    def fill(self, state, bitmask: torch.Tensor) -> None: ...
    def accept(self, state, token: int) -> None: ...
    def is_done(self, state) -> bool: ...


class LLGuidance(Lib):
    name = "llguidance"

    def setup(self, tokenizer, eos):
        import llguidance
        import llguidance.hf
        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=eos)

    def compile(self, kind, spec):
        M = self.ll.LLMatcher
        if kind == "regex":
            grammar = M.grammar_from_regex(spec)
        elif kind == "json":
            grammar = M.grammar_from_json_schema(json.dumps(spec))
        else:
            grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
        m = M(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m  # a matcher at the start state: states are its deep copies

    def new_state(self, compiled):
        return compiled.deep_copy()

    def copy(self, state):
        return state.deep_copy()

    def fill(self, state, bitmask):
        state.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def accept(self, state, token):
        assert state.consume_token(token), state.get_error()

    def is_done(self, state):
        return state.is_stopped()


class XGrammar(Lib):
    name = "xgrammar"

    def setup(self, tokenizer, eos):
        import xgrammar as xgr
        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer), stop_token_ids=eos)
        self.info = info
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def compile(self, kind, spec):
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(spec), any_whitespace=True)
        return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec))

    def new_state(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def copy(self, state):
        return state.fork()

    def fill(self, state, bitmask):
        state.fill_next_token_bitmask(bitmask)

    def accept(self, state, token):
        assert state.accept_token(token)

    def is_done(self, state):
        return state.is_terminated()


class OutlinesCore(Lib):
    name = "outlines-core"

    def setup(self, tokenizer, eos):
        import outlines_core as oc
        self.oc = oc
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in byte_level_vocab(tokenizer).items():
            by_bytes.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(eos[0], by_bytes)  # outlines-core takes one EOS id

    def compile(self, kind, spec):
        if kind == "regex":
            regex = spec
        elif kind == "json":
            regex = self.oc.json_schema.build_regex_from_schema(json.dumps(spec))
        else:
            regex = "(" + "|".join(_re_escape(c) for c in spec) + ")"
        return self.oc.Index(regex, self.vocab)

    def new_state(self, compiled):
        return self.oc.Guide(compiled)

    def copy(self, state):
        import copy
        return copy.copy(state)

    def fill(self, state, bitmask):
        state.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)

    def accept(self, state, token):
        state.advance(token, return_tokens=False)

    def is_done(self, state):
        return state.is_finished()


def _re_escape(text: str) -> str:
    return "".join("\\" + c if c in r".^$*+?()[]{}|\/-" else c for c in text)


# -- the measurement ----------------------------------------------------------------------------------
def measure(lib: Lib, tokenizer, eos: list[int], repeat: int) -> list[dict]:
    rows = []
    _, t_setup = timed(lambda: lib.setup(tokenizer, eos))
    vocab = len(tokenizer)
    bitmask = torch.full(((vocab + 31) // 32,), -1, dtype=torch.int32)
    for kind, label, spec, sample in (("regex", "regex", REGEX, REGEX_SAMPLE),
                                      ("json", "json schema", SCHEMA, SCHEMA_SAMPLE),
                                      ("choice", "choice", CHOICES, CHOICE_SAMPLE)):
        try:
            compiled, t_compile = timed(lambda: lib.compile(kind, spec), max(1, min(repeat, 5)))
        except Exception as e:  # noqa: BLE001 - reported in the table
            rows.append(dict(lib=lib.name, grammar=label, error=str(e)[:120]))
            continue
        tokens = tokenizer.encode(sample, add_special_tokens=False)
        _, t_new = timed(lambda: lib.new_state(compiled), 50)
        state0 = lib.new_state(compiled)
        _, t_copy = timed(lambda: lib.copy(state0), 50)

        def drive():
            state = lib.new_state(compiled)
            for pos, t in enumerate(tokens):
                lib.fill(state, bitmask)
                if not (bitmask[t // 32] >> (t % 32)) & 1:
                    raise AssertionError(f"WRONG MASK: disallows token {pos} ({tokenizer.decode([t])!r}) of "
                                         f"the valid {sample!r}")
                lib.accept(state, t)
            lib.fill(state, bitmask)
            if not (bitmask[eos[0] // 32] >> (eos[0] % 32)) & 1:
                raise AssertionError(f"WRONG MASK: EOS not allowed after the valid {sample!r}")
            return state

        try:
            t0 = time.perf_counter()
            drive()  # the first sequence of a fresh grammar: lazy lexers and caches fill here
            t_first = time.perf_counter() - t0
        except AssertionError as e:
            rows.append(dict(lib=lib.name, grammar=label, error=str(e)))
            continue
        _, t_drive = timed(drive, repeat)
        per_token = (t_drive - t_new) / (len(tokens) + 1)
        rows.append(dict(lib=lib.name, grammar=label, setup_ms=t_setup * 1e3, compile_ms=t_compile * 1e3,
                         new_state_us=t_new * 1e6, copy_us=t_copy * 1e6, per_token_us=per_token * 1e6,
                         first_ms=t_first * 1e3,
                         tokens=len(tokens)))
    return rows


def measure_engine_mask(tokenizer, eos: list[int], batch_sizes=(1, 16, 64, 256), repeat: int = 10) -> list[str]:
    """rlserve.engine.structured.build_allowed_mask for B JSON-schema sequences at assorted points of the
    sample: the host fill (serial and thread pool), the unpack into the [B, V] bool mask, and the whole call."""
    import rlserve.engine.structured as st

    compiler = st.GrammarCompiler(tokenizer, eos)
    grammar = compiler.compile({"json": SCHEMA})
    tokens = tokenizer.encode(SCHEMA_SAMPLE, add_special_tokens=False)
    vocab = len(tokenizer)
    lines = []
    for batch in batch_sizes:
        states = []
        for i in range(batch):
            state = grammar.new_state()
            for t in tokens[:(i * 7) % len(tokens)]:
                state.accept(t)
            states.append(state)
        packed = torch.zeros(batch, compiler.mask_words, dtype=torch.int32)
        old = st._PARALLEL_MIN_ROWS
        st._PARALLEL_MIN_ROWS = 10**9
        _, serial = timed(lambda: compiler._fill_packed(states, packed), repeat)
        st._PARALLEL_MIN_ROWS = 1
        _, pool = timed(lambda: compiler._fill_packed(states, packed), repeat)
        st._PARALLEL_MIN_ROWS = old
        _, unpack = timed(lambda: st.unpack_bitmask(packed, vocab), repeat)
        _, whole = timed(lambda: st.build_allowed_mask(states, vocab, "cpu"), repeat)
        lines.append(f"| {batch} | {serial * 1e3:.3f} | {pool * 1e3:.3f} | {unpack * 1e3:.3f} | {whole * 1e3:.3f} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--libs", default="llguidance,xgrammar,outlines-core")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from rlserve.models.tiny import IM_END_ID, make_byte_tokenizer
    tokenizers = [("byte (259)", make_byte_tokenizer(), [IM_END_ID])]
    bpe = bpe_tokenizer()
    tokenizers.append((f"bpe ({len(bpe)})", bpe, [bpe.eos_token_id]))
    libs = {cls.name: cls for cls in (LLGuidance, XGrammar, OutlinesCore)}
    print("| tokenizer | library | grammar | setup ms | compile ms | new state us | copy us | first sequence ms "
          "| per token us (mask+accept) | tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for tok_name, tok, eos in tokenizers:
        for name in args.libs.split(","):
            try:
                lib = libs[name]()
                rows = measure(lib, tok, eos, args.repeat)
            except ImportError as e:
                print(f"| {tok_name} | {name} | not installed: {e} |", file=sys.stderr)
                continue
            for r in rows:
                if "error" in r:
                    print(f"| {tok_name} | {r['lib']} | {r['grammar']} | error: {r['error']} |")
                    continue
                print(f"| {tok_name} | {r['lib']} | {r['grammar']} | {r['setup_ms']:.1f} | {r['compile_ms']:.2f} | "
                      f"{r['new_state_us']:.1f} | {r['copy_us']:.1f} | {r['first_ms']:.2f} | "
                      f"{r['per_token_us']:.1f} | {r['tokens']} |")
            sys.stdout.flush()
    if "llguidance" in args.libs:
        print(f"\nbuild_allowed_mask, JSON schema, {tokenizers[-1][0]} tokenizer, torch threads "
              f"{torch.get_num_threads()}:\n")
        print("| rows | fill serial ms | fill thread pool ms | unpack ms | build_allowed_mask ms |")
        print("|---|---|---|---|---|")
        for line in measure_engine_mask(tokenizers[-1][1], tokenizers[-1][2], repeat=args.repeat):
            print(line)


if __name__ == "__main__":
    main()
