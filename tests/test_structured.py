"""Structured outputs (rlserve.engine.structured): compiling specs, driving states, batched masks. CPU, fast."""

from __future__ import annotations

import json
import random
import re
import unicodedata

import pytest
import torch

from rlserve.engine.structured import (
    GrammarCompiler,
    build_allowed_mask,
    check_spec,
    parse_spec,
    unpack_bitmask,
)
from rlserve.models.tiny import BYTE_VOCAB, ENDOFTEXT_ID, IM_END_ID, IM_START_ID, make_byte_tokenizer

EOS = (IM_END_ID, ENDOFTEXT_ID)  # what the tiny models' generation_config names
MODEL_VOCAB = BYTE_VOCAB + 13  # a model vocabulary padded past the tokenizer's
REGEX = r"\d{1,3}(\.\d+)?"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "mood": {"enum": ["happy", "sad", 3]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "ok": {"type": "boolean"},
        "inner": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                  "additionalProperties": False},
    },
    "required": ["name", "age", "mood", "ok", "inner"],
    "additionalProperties": False,
}
CHOICES = ["yes", "no", "no way", 'say "hi"\n', "ünïcødé ✓"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(scope="module", params=["library_eos", "one_library_eos"])
def compiler(tokenizer, request):
    """``one_library_eos``: the library takes one EOS id, as llguidance < 1.7 (which vLLM 0.20-0.21 pin) does,
    and the compiler adds the others itself; every test must pass either way."""
    compiler = GrammarCompiler(tokenizer, EOS)
    if request.param == "library_eos":
        return compiler
    import llguidance.hf
    original = llguidance.hf.from_tokenizer

    def one_eos(*args, eos_token=None, **kwargs):
        if isinstance(eos_token, list):
            raise TypeError("argument 'eos_token': 'list' object cannot be interpreted as an integer")
        return original(*args, eos_token=eos_token, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(llguidance.hf, "from_tokenizer", one_eos)
        assert compiler.ll_tokenizer is not None  # made now, under the patch
    assert compiler.eos_token_ids == list(EOS) and compiler._extra_eos == [EOS[1]]
    return compiler


def walk(states, rng: random.Random, p_end: float = 0.4, max_steps: int = 2000, vocab: int = MODEL_VOCAB,
         others: int = 0) -> list[list[int]]:
    """Drive states in lockstep as the engine would: one batched mask per step (with ``others`` unguided rows
    interleaved), a random allowed token per row (EOS with probability ``p_end`` when allowed), accept, until
    every state has drawn EOS or terminated. Returns each state's tokens, EOS excluded."""
    outputs = [[] for _ in states]
    live = list(range(len(states)))
    for _ in range(max_steps):
        if not live:
            return outputs
        rows = []
        for i in live:
            rows += [None] * others + [states[i]]
        mask = build_allowed_mask(rows, vocab, "cpu")
        assert mask.shape == (len(rows), vocab) and mask.dtype == torch.bool
        for r, state in enumerate(rows):
            if state is None:
                assert bool(mask[r].all())
        guided = mask[[r for r, s in enumerate(rows) if s is not None]]
        assert not guided[:, BYTE_VOCAB:].any(), "a token past the tokenizer's vocabulary is allowed"
        assert not guided[:, IM_START_ID].any(), "a special token that is not EOS is allowed"
        still = []
        for i, allowed in zip(live, guided):
            state = states[i]
            ids = allowed.nonzero().flatten().tolist()
            assert ids, "empty mask"
            eos_ok = [t for t in ids if t in EOS]
            assert bool(eos_ok) == state.is_accepting(), "EOS must be allowed exactly when the grammar can end"
            non_eos = [t for t in ids if t not in EOS]
            if state.is_terminated():
                assert not non_eos
            if not non_eos or (eos_ok and rng.random() < p_end):
                assert state.accept(rng.choice(eos_ok))
                assert state.is_terminated()
                continue
            token = rng.choice(non_eos)
            assert state.accept(token), state.error
            outputs[i].append(token)
            if not state.is_terminated():
                still.append(i)
        live = still
    raise AssertionError("walk did not terminate")


def text_of(tokens: list[int]) -> str:
    return bytes(tokens).decode("utf-8")  # byte tokenizer: token b is byte b; must be valid UTF-8


# -- compiling ------------------------------------------------------------------------------------------
def test_compile_kinds(compiler):
    assert compiler.compile({"regex": REGEX}).kind == "regex"
    assert compiler.compile({"json": SCHEMA}).kind == "json"
    assert compiler.compile({"json": json.dumps(SCHEMA)}).kind == "json"
    assert compiler.compile({"choice": CHOICES}).kind == "choice"
    assert compiler.compile({"grammar": 'start: "a" b\nb: "b"+'}).kind == "grammar"
    assert compiler.compile({"json_object": True}).kind == "json"
    # None-valued keys and backend hints are ignored (a serialised vLLM StructuredOutputsParams).
    assert compiler.compile({"regex": REGEX, "json": None, "choice": None, "grammar": None,
                             "json_object": None, "disable_fallback": False}).kind == "regex"
    assert compiler.vocab_size == BYTE_VOCAB


@pytest.mark.parametrize("spec, message", [
    ({"regex": "a(?=b)"}, "structured_outputs.regex: cannot compile 'a(?=b)': look-around"),
    ({"regex": "(a"}, "structured_outputs.regex: cannot compile '(a'"),
    ({"regex": r"(a)\1"}, "backreferences are not supported"),
    ({"regex": 5}, "structured_outputs.regex must be a string"),
    ({"json": {"type": "foo"}}, "structured_outputs.json: cannot compile the schema: Invalid type: foo"),
    ({"json": {"not": {"type": "string"}}}, "structured_outputs.json: cannot compile the schema: Unimplemented"),
    ({"json": {"type": "integer", "minimum": 5, "maximum": 2}}, "Unsatisfiable"),
    ({"json": "{not json"}, "structured_outputs.json: the schema is not valid JSON"),
    ({"json": [1, 2]}, "structured_outputs.json must be a JSON schema"),
    ({"choice": []}, "structured_outputs.choice must be a non-empty list"),
    ({"choice": "abc"}, "structured_outputs.choice must be a non-empty list"),
    ({"choice": ["a", 1]}, "structured_outputs.choice[1] must be a string"),
    ({"grammar": "start: ("}, "structured_outputs.grammar: cannot compile the grammar"),
    ({"regex": "a", "json": {}}, "exactly one of"),
    ({}, "must set one of"),
    ({"regex": None}, "must set one of"),
    ({"regexp": "a"}, "unknown key 'regexp'"),
    ({"structural_tag": "x"}, "structured_outputs.structural_tag is not supported"),
    ({"regex": "a", "disable_any_whitespace": True}, "only apply to 'json'"),
    ("a+", "structured_outputs must be an object"),
])
def test_invalid_specs_raise_value_error(compiler, spec, message):
    with pytest.raises(ValueError) as info:
        compiler.compile(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)  # one line, fit for a 400's message
    with pytest.raises(ValueError, match=re.escape(message)):
        check_spec(spec)  # the same checks without a tokenizer (for the front end)


def test_cache(tokenizer):
    compiler = GrammarCompiler(tokenizer, EOS, cache_size=2)
    a = compiler.compile({"regex": REGEX})
    assert compiler.compile({"regex": REGEX}) is a
    assert compiler.compile({"regex": REGEX, "json": None}) is a
    s = compiler.compile({"json": SCHEMA})
    assert compiler.compile({"json": json.dumps(SCHEMA)}) is s  # the schema's text and the schema
    assert compiler.compile({"json": json.loads(json.dumps(SCHEMA))}) is s
    assert compiler.compile({"json": SCHEMA, "disable_any_whitespace": True}) is not s  # options are keyed
    assert compiler.cache_info()["hits"] == 4
    compiler.compile({"choice": CHOICES})  # capacity 2: the least recently used (the regex) goes
    assert compiler.compile({"regex": REGEX}) is not a
    assert compiler.cache_info()["size"] == 2


def test_tokenizer_from_path(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    compiler = GrammarCompiler(str(tmp_path), EOS)
    state = compiler.compile({"choice": ["ok"]}).new_state()
    assert state.allowed_token_ids() == [ord("o")]


# -- driving states -------------------------------------------------------------------------------------
def _is_digit(c: str) -> bool:
    # llguidance's \d is Unicode's decimal digits, as is Python's; its Unicode tables may be newer than
    # Python's, so a code point Python does not know (category Cn) passes too.
    return c.isdecimal() or unicodedata.category(c) == "Cn"


def _matches_unicode_regex(text: str) -> bool:
    whole, point, frac = text.partition(".")
    return (1 <= len(whole) <= 3 and all(map(_is_digit, whole))
            and (not point or (len(frac) >= 1 and all(map(_is_digit, frac)))))


@pytest.mark.parametrize("regex, check", [
    (r"[0-9]{1,3}(\.[0-9]+)?", lambda text: re.fullmatch(r"[0-9]{1,3}(\.[0-9]+)?", text)),
    (REGEX, _matches_unicode_regex),
])
def test_regex_walks_match(compiler, regex, check):
    grammar = compiler.compile({"regex": regex})
    rng = random.Random(0)
    texts = []
    for _ in range(6):
        texts += [text_of(t) for t in walk([grammar.new_state() for _ in range(16)], rng, others=1)]
    for text in texts:
        assert check(text), text
    assert any("." in t for t in texts) and any("." not in t for t in texts)
    assert any(len(t.split(".")[0]) == 3 for t in texts)


def test_regex_eos_exactly_when_complete(compiler):
    state = compiler.compile({"regex": REGEX}).new_state()

    def eos_allowed():
        return [t for t in state.allowed_token_ids() if t in EOS]

    assert eos_allowed() == []  # an empty answer does not match
    for ch, complete in zip(b"123.45", [True, True, True, False, True, True]):
        assert state.accept(ch)
        assert (eos_allowed() == sorted(EOS)) == complete, chr(ch)
        assert state.is_accepting() == complete
    assert not state.is_terminated()  # more digits may follow
    assert not state.accept(ord("."))  # a second point is not allowed
    assert state.is_terminated() and state.error
    assert state.allowed_token_ids() == sorted(EOS)  # a state in error only lets the sequence end


def test_terminated_when_only_eos_can_follow(compiler):
    state = compiler.compile({"regex": r"\d{3}"}).new_state()
    for ch in b"12":
        state.accept(ch)
        assert not state.is_terminated()
    state.accept(ord("7"))
    assert state.is_terminated() and state.is_accepting() and state.error is None
    assert state.allowed_token_ids() == sorted(EOS)
    assert state.accept(IM_END_ID)  # drawing EOS then is fine


def check_schema_value(value):
    assert isinstance(value, dict)
    assert set(value) <= set(SCHEMA["properties"]) and set(SCHEMA["required"]) <= set(value)
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool) and 0 <= value["age"] <= 150
    assert value["mood"] in ("happy", "sad", 3)
    assert isinstance(value["ok"], bool)
    assert isinstance(value["inner"], dict) and set(value["inner"]) == {"x"} and isinstance(value["inner"]["x"], int)
    if "score" in value:
        assert isinstance(value["score"], (int, float)) and not isinstance(value["score"], bool)
    if "tags" in value:
        assert isinstance(value["tags"], list) and len(value["tags"]) <= 3
        assert all(isinstance(t, str) and len(t) <= 4 for t in value["tags"])


@pytest.mark.parametrize("compact", [True, False])
def test_json_walks_validate(compiler, compact):
    spec = {"json": SCHEMA, "disable_any_whitespace": True} if compact else {"json": json.dumps(SCHEMA)}
    grammar = compiler.compile(spec)
    rng = random.Random(1 + compact)
    outputs = walk([grammar.new_state() for _ in range(24 if compact else 8)], rng, p_end=0.5)
    for tokens in outputs:
        text = text_of(tokens)
        check_schema_value(json.loads(text))
        if compact:
            assert not re.search(r"\s", re.sub(r'"(\\.|[^"\\])*"', '""', text)), text


def test_json_object(compiler):
    state = compiler.compile({"json_object": True, "disable_any_whitespace": True}).new_state()
    assert state.allowed_token_ids() == [ord("{")]  # an object, nothing else
    for ch in b'{"a":[1,{"b":null}]}':
        assert state.accept(ch), state.error
    assert state.is_terminated() and state.allowed_token_ids() == sorted(EOS)


def test_choice_walks(compiler):
    grammar = compiler.compile({"choice": CHOICES})
    texts = [text_of(t) for t in walk([grammar.new_state() for _ in range(64)], random.Random(4), p_end=0.5)]
    assert set(texts) <= set(CHOICES)
    assert {"no", "no way"} <= set(texts)  # one choice a prefix of another: both reachable


def test_grammar_kind(compiler):
    grammar = compiler.compile({"grammar": 'start: "(" item ("," item)* ")"\nitem: /[a-c]/'})
    for tokens in walk([grammar.new_state() for _ in range(8)], random.Random(5)):
        assert re.fullmatch(r"\([a-c](,[a-c])*\)", text_of(tokens))


def test_fork_is_independent(compiler):
    grammar = compiler.compile({"regex": r"(ab|cd)e"})
    parent = grammar.new_state()
    child = parent.copy()  # the fork of n samples: before the parent takes its first token
    assert parent.accept(ord("a"))
    assert child.allowed_token_ids() == [ord("a"), ord("c")]
    assert child.accept(ord("c"))
    assert parent.allowed_token_ids() == [ord("b")] and child.allowed_token_ids() == [ord("d")]
    grand = parent.copy()
    assert grand.num_tokens == 1 and grand.allowed_token_ids() == [ord("b")]


# -- batched masks --------------------------------------------------------------------------------------
def test_no_grammar_no_mask():
    assert build_allowed_mask([], MODEL_VOCAB, "cpu") is None
    assert build_allowed_mask([None, None, None], MODEL_VOCAB, "cpu") is None


def test_mask_rows(compiler):
    regex = compiler.compile({"regex": r"[ab]c"}).new_state()
    choice = compiler.compile({"choice": ["x", "yz"]}).new_state()
    shared = compiler.compile({"regex": r"\d"}).new_state()
    states = [None, regex, shared, None, shared, choice, shared]
    mask = build_allowed_mask(states, MODEL_VOCAB, "cpu")
    assert mask.shape == (7, MODEL_VOCAB)
    assert mask[0].all() and mask[3].all()
    assert mask[1].nonzero().flatten().tolist() == [ord("a"), ord("b")]
    assert mask[5].nonzero().flatten().tolist() == [ord("x"), ord("y")]
    for r in (2, 4, 6):  # one state on several rows (a parent's n first draws)
        assert torch.equal(mask[r], mask[2])
        assert set(mask[r].nonzero().flatten().tolist()) >= set(range(ord("0"), ord("9") + 1))
    # Every row guided by its own state, model vocabulary = tokenizer vocabulary: the fast path.
    mask = build_allowed_mask([regex, choice], BYTE_VOCAB, "cpu")
    assert mask.shape == (2, BYTE_VOCAB) and int(mask.sum()) == 4
    # All rows guided, padded model vocabulary.
    mask = build_allowed_mask([regex, choice], MODEL_VOCAB, "cpu")
    assert int(mask.sum()) == 4 and not mask[:, BYTE_VOCAB:].any()


def test_fill_mask_bool_and_bitmask_agree(compiler):
    state = compiler.compile({"json": SCHEMA}).new_state()
    for ch in b'{"name": "':
        assert state.accept(ch)
    row = torch.zeros(MODEL_VOCAB, dtype=torch.bool)
    state.fill_mask(row)
    words = torch.zeros(compiler.mask_words + 1, dtype=torch.int32)
    state.fill_mask(words)
    assert torch.equal(unpack_bitmask(words.view(1, -1), BYTE_VOCAB)[0], row[:BYTE_VOCAB])
    assert not row[BYTE_VOCAB:].any() and row[ord("a")] and row[ord('"')] and not row[IM_END_ID]


def test_unpack_bitmask_matches_reference():
    gen = torch.Generator().manual_seed(0)
    packed = torch.randint(-2**31, 2**31 - 1, (5, 7), dtype=torch.int32, generator=gen)
    expected = torch.tensor([[(int(packed[r, t // 32]) >> (t % 32)) & 1 for t in range(7 * 32)]
                             for r in range(5)], dtype=torch.bool)
    assert torch.equal(unpack_bitmask(packed, 7 * 32), expected)
    assert torch.equal(unpack_bitmask(packed, 200), expected[:, :200])


def test_masked_sampling_logprobs(compiler):
    """The engine's sampler fills disallowed logits with -inf before sampling: the logprobs are those of the
    masked distribution, and only allowed tokens are ever drawn."""
    import dataclasses

    from rlserve.engine.sampler import SamplingBatch, sample

    state = compiler.compile({"choice": ["ab", "cd"]}).new_state()
    mask = build_allowed_mask([state, None], MODEL_VOCAB, "cpu")
    logits = torch.randn(2, MODEL_VOCAB, generator=torch.Generator().manual_seed(0))
    logits[0, ord("z")] = 100.0  # the unmasked favourite is not allowed
    expected = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    known = {"logits_index": torch.arange(2), "temperature": torch.ones(2),
             "is_greedy": torch.ones(2, dtype=torch.bool), "all_greedy": True, "any_greedy": True,
             "uniform": torch.full((2,), 0.5), "seeds": torch.zeros(2, dtype=torch.int64),
             "needs_gather": False, "allowed_mask": mask, "max_num_logprobs": 0}
    kwargs = {}
    for f in dataclasses.fields(SamplingBatch):  # the sampler's batch is being reworked: fill what it has
        if f.name in known:
            kwargs[f.name] = known[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            pytest.skip(f"SamplingBatch has a new required field {f.name!r}")
    out = sample(logits.clone(), SamplingBatch(**kwargs))
    token = int(out.token_ids[0])
    assert token == int(expected[0].argmax()) and token in (ord("a"), ord("c"))
    assert int(out.token_ids[1]) == ord("z") or int(out.token_ids[1]) == int(logits[1].argmax())
    assert torch.allclose(out.logprobs, expected.gather(1, out.token_ids.unsqueeze(1)).squeeze(1))


def test_parse_spec_canonical():
    assert parse_spec({"choice": ("a", "b")}).key == parse_spec({"choice": ["a", "b"]}).key
    a = parse_spec({"json": {"type": "object", "properties": {"a": {}, "b": {}}}})
    b = parse_spec({"json": {"type": "object", "properties": {"b": {}, "a": {}}}})
    assert a.key != b.key  # property order is the output's order: not the same grammar


# -- a real BPE vocabulary (multi-byte tokens) --------------------------------------------------------------
@pytest.fixture(scope="module")
def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "name", "age", "true", "false", "null", "value"]
    corpus = []
    for _ in range(2000):
        obj = {rng.choice(words): rng.choice([rng.randint(0, 999), round(rng.random() * 100, 3),
                                              rng.choice(words), [rng.choice(words)], rng.random() < 0.5])
               for _ in range(rng.randint(1, 4))}
        corpus.append(json.dumps(obj))
        corpus.append(" ".join(rng.choice(words) for _ in range(8)))
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def test_bpe_vocabulary(bpe_tokenizer):
    eos = bpe_tokenizer.eos_token_id
    compiler = GrammarCompiler(bpe_tokenizer, [eos])
    vocab = len(bpe_tokenizer)
    assert compiler.vocab_size == vocab
    multi = {i for t, i in bpe_tokenizer.get_vocab().items() if len(t) > 1}
    choices = ["alpha beta", "alpha", "gamma"]
    cases = [({"regex": REGEX}, _matches_unicode_regex),
             ({"json": SCHEMA, "disable_any_whitespace": True}, lambda s: check_schema_value(json.loads(s)) or True),
             ({"choice": choices}, lambda s: s in choices)]
    for spec, check in cases:
        grammar = compiler.compile(spec)
        rng = random.Random(7)
        used_multi = False
        for _ in range(12):
            state = grammar.new_state()
            tokens = []
            for _ in range(2000):
                mask = build_allowed_mask([state], vocab + 64, "cpu")[0]
                assert not mask[vocab:].any()
                ids = mask.nonzero().flatten().tolist()
                assert (eos in ids) == state.is_accepting()
                non_eos = [t for t in ids if t != eos]
                if not non_eos or (eos in ids and rng.random() < 0.4):
                    break
                token = rng.choice(non_eos)
                used_multi |= token in multi
                assert state.accept(token), state.error
                tokens.append(token)
            else:
                raise AssertionError("did not terminate")
            assert check(bpe_tokenizer.decode(tokens)), bpe_tokenizer.decode(tokens)
        assert used_multi, spec  # multi-character tokens were allowed and drawn
