"""Structured (grammar-guided) outputs: per-sequence token masks from a regex, a JSON schema or a choice list.

Built on llguidance (see notes/structured_outputs.md for the measurements behind the choice). The engine sees
four things, none of which names the library:

- ``GrammarCompiler`` -- one per engine. ``compile(spec)`` turns a request's ``structured_outputs`` into a
  ``CompiledGrammar``, cached (LRU) by (kind, canonical spec, options); a spec that cannot be compiled raises
  ``ValueError("structured_outputs.<kind>: ...")``, which the server answers with a 400.
- ``CompiledGrammar.new_state()`` -- a ``GrammarState`` at the grammar's start, one per sample sequence. The
  grammar constrains the completion only: states never see the prompt.
- ``GrammarState`` -- ``accept(token)`` after each newly sampled token, ``is_terminated()`` (only EOS may
  follow: the engine finishes the sequence with finish_reason "stop"), ``copy()`` for the fork into n samples.
- ``build_allowed_mask(states, vocab_size, device)`` -- the ``[S, V]`` bool mask (True = allowed) for one
  sampling step, ``None`` when no row is guided so that unconstrained batches pay nothing. Rows without a
  grammar are all True; guided rows allow the grammar's tokens, EOS exactly when the grammar can end, and
  never a token beyond the tokenizer's vocabulary (a model's vocabulary is often padded past it).

Masks are computed on the host as packed int32 bitmasks (one bit per token, by the library, in parallel
threads for large batches), copied to the device 32x smaller than a bool mask, and unpacked there with one
vectorised op.
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch

# Keys of ``structured_outputs`` that name the constraint (exactly one must be set).
CONSTRAINT_KEYS = ("regex", "json", "choice", "grammar", "json_object")
# Options (vLLM's StructuredOutputsParams spells them so): used for JSON, or accepted and ignored.
_JSON_OPTION_KEYS = ("disable_any_whitespace", "whitespace_pattern")
_IGNORED_KEYS = ("disable_fallback", "backend", "_backend", "_backend_was_auto")
# Accepted only when unset/false: features not implemented here.
_UNSUPPORTED_KEYS = ("structural_tag", "disable_additional_properties")

_PARALLEL_MIN_ROWS = 8  # below this, filling masks one by one beats handing them to the thread pool


# -- the request's spec ---------------------------------------------------------------------------------
class GrammarSpec:
    """A validated, canonical ``structured_outputs``: kind in regex | json | choice | grammar."""

    __slots__ = ("kind", "value", "options", "key")

    def __init__(self, kind: str, value: Any, options: tuple[tuple[str, Any], ...] = ()):
        self.kind = kind
        self.value = value
        self.options = options
        if kind == "regex" or kind == "grammar":
            canonical = value
        else:  # key order is kept: a schema's property order is the order the output will have
            canonical = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        self.key = (kind, canonical, options)

    def __repr__(self) -> str:
        return f"GrammarSpec({self.kind}, {self.key[1][:60]!r})"


def parse_spec(spec: Any) -> GrammarSpec:
    """Check the shape of a ``structured_outputs`` value; raises ValueError naming the problem.

    Accepted: ``{"regex": str}``, ``{"json": dict | bool | str}`` (a JSON schema, or its text),
    ``{"choice": [str, ...]}``, ``{"grammar": str}`` (Lark or GBNF), ``{"json_object": true}`` (any JSON
    object). Keys whose value is None are ignored, so a serialised vLLM ``StructuredOutputsParams`` works;
    JSON options: ``disable_any_whitespace`` (bool), ``whitespace_pattern`` (str)."""
    if isinstance(spec, GrammarSpec):
        return spec
    if not isinstance(spec, dict):
        raise ValueError(f"structured_outputs must be an object with one of 'regex', 'json', 'choice', "
                         f"'grammar', got {type(spec).__name__}")
    set_keys = []
    options: dict[str, Any] = {}
    for key, value in spec.items():
        if value is None:
            continue
        if key in CONSTRAINT_KEYS:
            if key == "json_object" and value is False:
                continue
            set_keys.append(key)
        elif key in _JSON_OPTION_KEYS:
            options[key] = value
        elif key in _IGNORED_KEYS:
            continue
        elif key in _UNSUPPORTED_KEYS:
            if value:
                raise ValueError(f"structured_outputs.{key} is not supported")
        else:
            raise ValueError(f"structured_outputs: unknown key {key!r} (expected one of 'regex', 'json', "
                             f"'choice', 'grammar')")
    if not set_keys:
        raise ValueError("structured_outputs must set one of 'regex', 'json', 'choice', 'grammar'")
    if len(set_keys) > 1:
        raise ValueError(f"structured_outputs must set exactly one of 'regex', 'json', 'choice', 'grammar', "
                         f"got {' and '.join(repr(k) for k in set_keys)}")
    kind = set_keys[0]
    value = spec[kind]

    if kind == "json_object":
        if value is not True:
            raise ValueError("structured_outputs.json_object must be true")
        kind, value = "json", {"type": "object"}
    if kind != "json" and options:
        raise ValueError(f"structured_outputs: {', '.join(sorted(options))} only apply to 'json'")
    if kind in ("regex", "grammar"):
        if not isinstance(value, str):
            raise ValueError(f"structured_outputs.{kind} must be a string, got {type(value).__name__}")
        if kind == "grammar" and not value.strip():
            raise ValueError("structured_outputs.grammar must not be empty")
    elif kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json: the schema is not valid JSON: {e}") from None
        if not isinstance(value, (dict, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object), "
                             f"got {type(value).__name__}")
        if "disable_any_whitespace" in options and not isinstance(options["disable_any_whitespace"], bool):
            raise ValueError("structured_outputs.disable_any_whitespace must be a boolean")
        if "whitespace_pattern" in options and not isinstance(options["whitespace_pattern"], str):
            raise ValueError("structured_outputs.whitespace_pattern must be a string")
    elif kind == "choice":
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        for i, c in enumerate(value):
            if not isinstance(c, str):
                raise ValueError(f"structured_outputs.choice[{i}] must be a string, got {type(c).__name__}")
        value = list(value)
    return GrammarSpec(kind, value, tuple(sorted(options.items())))


def _to_llguidance(spec: GrammarSpec) -> str:
    """The llguidance grammar text of a spec (not yet checked: LLMatcher reports its errors)."""
    from llguidance import LLMatcher, grammar_from

    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "json":
        options = dict(spec.options)
        overrides = {}
        if options.get("disable_any_whitespace"):
            overrides["whitespace_flexible"] = False
        if "whitespace_pattern" in options:
            overrides["whitespace_pattern"] = options["whitespace_pattern"]
        try:
            return LLMatcher.grammar_from_json_schema(json.dumps(spec.value), overrides=overrides or None)
        except ValueError as e:
            raise ValueError(f"structured_outputs.json: cannot compile the schema: {e}") from None
    if spec.kind == "choice":
        # Lark string literals take JSON's escapes; every choice is matched byte for byte.
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                  for c in spec.value))
    try:
        return grammar_from("grammar", spec.value)  # Lark, or GBNF converted to Lark
    except ValueError as e:
        raise ValueError(f"structured_outputs.grammar: cannot compile the grammar: {e}") from None


def _compile_error(spec: GrammarSpec, message: str) -> ValueError:
    """A one-line reason from llguidance's message (which may carry a multi-line excerpt of the grammar)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    reason = next((line[len("error:"):].strip() for line in lines if line.startswith("error:")), None)
    if reason is None:
        reason = lines[0] if lines else "unknown error"
    if len(reason) > 300:
        reason = reason[:300] + "..."
    if spec.kind == "regex":
        return ValueError(f"structured_outputs.regex: cannot compile {spec.value!r}: {reason}")
    if spec.kind == "json":
        return ValueError(f"structured_outputs.json: cannot compile the schema: {reason}")
    if spec.kind == "choice":
        return ValueError(f"structured_outputs.choice: cannot compile the choices: {reason}")
    return ValueError(f"structured_outputs.grammar: cannot compile the grammar: {reason}")


def check_spec(spec: Any) -> GrammarSpec:
    """Validate a ``structured_outputs`` without a tokenizer (for a front end that wants its 400 before the
    request reaches the engine): shape, regex syntax, schema support. Raises ValueError; returns the parsed
    spec. ``GrammarCompiler.compile`` runs the same checks."""
    from llguidance import LLMatcher

    parsed = parse_spec(spec)
    if parsed.key in _checked:  # a batch of prompts shares its spec: check it once
        _checked.move_to_end(parsed.key)
        return parsed
    grammar = _to_llguidance(parsed)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, None)
    if is_error:
        raise _compile_error(parsed, messages[0] if messages else "")
    _checked[parsed.key] = None
    while len(_checked) > 256:
        _checked.popitem(last=False)
    return parsed


_checked: OrderedDict[tuple, None] = OrderedDict()  # keys of specs check_spec passed, most recent last


# -- the compiler, compiled grammars and states ---------------------------------------------------------
class GrammarCompiler:
    """One per engine: the tokenizer as the library sees it, and an LRU cache of compiled grammars.

    ``tokenizer`` is a Hugging Face fast tokenizer, or a path to load one from (loaded at the first compile, so
    an engine that never gets a structured request never pays for it). ``eos_token_ids`` are the engine's: the
    mask allows them exactly when the grammar can end."""

    def __init__(self, tokenizer: Any, eos_token_ids: Sequence[int] = (), *, cache_size: int = 256,
                 num_threads: int | None = None):
        self._tokenizer_source = tokenizer
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.cache_size = cache_size
        self.num_threads = num_threads or max(1, min(8, os.cpu_count() or 1))
        self._cache: OrderedDict[tuple, CompiledGrammar] = OrderedDict()
        self._ll_tokenizer = None
        self._extra_eos: list[int] = []  # EOS ids the library does not know (llguidance < 1.7 knows one)
        self._executor = None
        self.num_hits = 0
        self.num_misses = 0

    # The tokenizer and the vocabulary the masks cover.
    @property
    def ll_tokenizer(self):
        if self._ll_tokenizer is None:
            import llguidance.hf

            tokenizer = self._tokenizer_source
            if isinstance(tokenizer, (str, Path)):
                from rlserve.tokenizer import load_tokenizer
                tokenizer = load_tokenizer(tokenizer)
            eos = self.eos_token_ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
            if not eos:
                raise ValueError("structured_outputs needs an EOS token: neither the model nor the tokenizer "
                                 "names one")
            try:
                try:
                    self._ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer),
                                                                      eos_token=eos)
                except TypeError:  # llguidance < 1.7 (vLLM 0.17-0.21 pin 1.3): one EOS; the others are ours
                    self._ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer),
                                                                      eos_token=eos[0])
            except ValueError as e:  # a slow (Python) tokenizer
                raise ValueError(f"structured_outputs: unsupported tokenizer: {e}") from None
            ll_eos = list(getattr(self._ll_tokenizer, "eos_tokens", [self._ll_tokenizer.eos_token]))
            self._extra_eos = [t for t in eos if t not in ll_eos]
            self.eos_token_ids = ll_eos + self._extra_eos
            self._tokenizer_source = None  # the HF tokenizer is no longer needed
        return self._ll_tokenizer

    @property
    def vocab_size(self) -> int:
        """Tokens the masks cover (the tokenizer's); model rows past it are never allowed in guided rows."""
        return self.ll_tokenizer.vocab_size

    @property
    def mask_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def compile(self, spec: Any) -> "CompiledGrammar":
        """The compiled grammar of a ``structured_outputs`` spec, from the cache when it was seen before."""
        parsed = parse_spec(spec)
        hit = self._cache.get(parsed.key)
        if hit is not None:
            self._cache.move_to_end(parsed.key)
            self.num_hits += 1
            return hit
        from llguidance import LLMatcher

        grammar = _to_llguidance(parsed)
        template = LLMatcher(self.ll_tokenizer, grammar, log_level=0)  # never raises: errors are a state
        if template.is_error():
            raise _compile_error(parsed, template.get_error())
        compiled = CompiledGrammar(self, parsed, template)
        self.num_misses += 1
        self._cache[parsed.key] = compiled
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return compiled

    def cache_info(self) -> dict:
        return {"size": len(self._cache), "hits": self.num_hits, "misses": self.num_misses}

    def _fill_packed(self, states: list["GrammarState"], packed: torch.Tensor) -> None:
        """Next-token bitmasks of ``states`` into the rows of ``packed`` ([len(states), mask_words] int32, CPU,
        contiguous); many rows are filled by the library's thread pool (it releases the GIL)."""
        words = packed.shape[1]
        if len(states) >= _PARALLEL_MIN_ROWS and self.num_threads > 1:
            if self._executor is None:
                from llguidance import LLExecutor
                self._executor = LLExecutor(self.num_threads)
            try:
                self._executor.unsafe_compute_mask_ptr([(s._matcher, i) for i, s in enumerate(states)],
                                                       packed.data_ptr(), words * 4, len(states))
            except Exception:  # find the state at fault below, one by one
                self._fill_each(states, packed)
        else:
            self._fill_each(states, packed)
        if self._extra_eos:  # allowed wherever the library's own EOS is
            first = self.eos_token_ids[0]
            can_end = (packed[:, first // 32] & _bit(first % 32)) != 0
            for t in self._extra_eos:
                packed[can_end, t // 32] |= _bit(t % 32)
        # A state in error (a token it had to reject) or a grammar with nothing left: EOS only, never an
        # all-masked row (its softmax would be NaN).
        empty = (packed == 0).all(dim=1)
        if bool(empty.any()):
            for i in empty.nonzero().flatten().tolist():
                for t in self.eos_token_ids:
                    packed[i, t // 32] |= _bit(t % 32)


    @staticmethod
    def _fill_each(states: list["GrammarState"], packed: torch.Tensor) -> None:
        """One mask at a time; a state whose mask cannot be computed is put in error (its row stays empty:
        EOS only, and the sample ends with finish reason "error"), the others are unaffected."""
        words = packed.shape[1]
        for i, s in enumerate(states):
            try:
                s._matcher.unsafe_compute_mask_ptr(packed[i].data_ptr(), words * 4)
            except Exception as e:
                packed[i] = 0
                s._error = f"structured_outputs: the grammar failed: {type(e).__name__}: {e}"


class CompiledGrammar:
    """A compiled grammar, shared by every request with the same spec; hands out per-sequence states."""

    __slots__ = ("compiler", "spec", "_template")

    def __init__(self, compiler: GrammarCompiler, spec: GrammarSpec, template):
        self.compiler = compiler
        self.spec = spec
        self._template = template  # a matcher at the start: states are its copies (about a microsecond)

    @property
    def kind(self) -> str:
        return self.spec.kind

    def new_state(self) -> "GrammarState":
        return GrammarState(self, self._template.deep_copy())

    def __repr__(self) -> str:
        return f"CompiledGrammar({self.spec!r})"


class GrammarState:
    """Where one sample sequence is in its grammar. Advance it with every newly sampled token, once."""

    __slots__ = ("grammar", "_matcher", "num_tokens", "_error")

    def __init__(self, grammar: CompiledGrammar, matcher):
        self.grammar = grammar
        self._matcher = matcher
        self.num_tokens = 0  # tokens accepted
        self._error: str | None = None

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token. Returns False (and the state is in error from then on: ``error``
        says why, ``is_terminated()`` is True and the mask allows EOS only) if the grammar does not allow it --
        which cannot happen for a token drawn under this state's mask. Accepting EOS when the grammar can end
        is allowed and terminates the state."""
        if self._error is not None:
            return False
        if not 0 <= token_id < self.grammar.compiler.vocab_size:
            self._error = f"token {token_id} is outside the tokenizer's vocabulary"
            return False
        if token_id in self.grammar.compiler._extra_eos:
            token_id = self.grammar.compiler.eos_token_ids[0]
        if not self._matcher.consume_token(token_id):
            self._error = self._matcher.get_error() or f"token {token_id} is not allowed here"
            return False
        self.num_tokens += 1
        return True

    def is_terminated(self) -> bool:
        """The grammar is complete and nothing but EOS may follow (or the state is in error)."""
        return self._error is not None or self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        """The text so far is a complete match (EOS is allowed), though it may also go on."""
        return self._error is None and self._matcher.is_accepting()

    @property
    def error(self) -> str | None:
        if self._error is None and self._matcher.is_error():
            self._error = self._matcher.get_error()
        return self._error

    def copy(self) -> "GrammarState":
        """An independent state at the same point (the fork of a request's n samples)."""
        state = GrammarState(self.grammar, self._matcher.deep_copy())
        state.num_tokens = self.num_tokens
        state._error = self._error
        return state

    fork = copy

    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the next step's allowed tokens into ``row``: either a packed int32 bitmask of at least
        ``mask_words`` words (bit t % 32 of word t // 32; CPU, contiguous), or a bool row of any length (True =
        allowed; entries past the tokenizer's vocabulary are set False)."""
        compiler = self.grammar.compiler
        words = compiler.mask_words
        if row.dtype == torch.int32:
            if row.dim() != 1 or row.numel() < words or not row.is_contiguous() or row.device.type != "cpu":
                raise ValueError(f"bitmask row must be a contiguous CPU int32 tensor of >= {words} words")
            compiler._fill_packed([self], row[:words].view(1, words))
            return
        if row.dtype != torch.bool or row.dim() != 1:
            raise ValueError("mask row must be a 1-D bool or int32 tensor")
        packed = torch.zeros(1, words, dtype=torch.int32)
        compiler._fill_packed([self], packed)
        width = min(row.numel(), compiler.vocab_size)
        row[:width] = unpack_bitmask(packed.to(row.device), width)[0]
        row[width:] = False

    def allowed_token_ids(self) -> list[int]:
        """The tokens allowed next (for tests and debugging; the engine uses ``build_allowed_mask``)."""
        row = torch.zeros(self.grammar.compiler.vocab_size, dtype=torch.bool)
        self.fill_mask(row)
        return row.nonzero().flatten().tolist()

    def __repr__(self) -> str:
        return (f"GrammarState({self.grammar.spec!r}, tokens={self.num_tokens}, "
                f"terminated={self.is_terminated()})")


# -- one sampling step's mask ---------------------------------------------------------------------------
def _bit(i: int) -> int:
    """int32 value with bit ``i`` set (bit 31 is the sign bit)."""
    return (1 << i) - (1 << 32) if i == 31 else 1 << i


_BYTE_BITS: dict[torch.device, torch.Tensor] = {}  # device -> [256, 8] bool: the bits of each byte value


def unpack_bitmask(packed: torch.Tensor, width: int) -> torch.Tensor:
    """[R, W] int32 packed bitmask -> [R, width] bool (width <= 32 W), vectorised on packed's device.

    Bit b of word w is token 32 w + b; on a little-endian layout that is bit b % 8 of byte 4 w + b // 8, so one
    table lookup per byte unpacks 8 tokens (faster on CPU than shifting each of the 32 bits out)."""
    if sys.byteorder != "little":  # pragma: no cover - no big-endian host runs this
        shifts = torch.arange(32, dtype=torch.int32, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & 1).bool().view(packed.shape[0], -1)[:, :width]
    table = _BYTE_BITS.get(packed.device)
    if table is None:
        table = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool().to(packed.device)
        _BYTE_BITS[packed.device] = table
    rows = packed.shape[0]
    as_bytes = packed.contiguous().view(torch.uint8).view(-1).long()
    return table.index_select(0, as_bytes).view(rows, -1)[:, :width]


def build_allowed_mask(states: Sequence[GrammarState | None], vocab_size: int,
                       device: torch.device | str | None = None) -> torch.Tensor | None:
    """The allowed-token mask of one sampling step: ``[len(states), vocab_size]`` bool on ``device``, True =
    allowed; all True for rows whose state is None. ``None`` when no row has a state (nothing to pay).

    A state listed on several rows (a request drawing its n first tokens from one parent) is computed once.
    Guided rows never allow a token at or past the tokenizer's vocabulary size."""
    num_rows = len(states)
    distinct: list[GrammarState] = []
    index_of: dict[int, int] = {}
    rows: list[int] = []
    sources: list[int] = []
    for r, state in enumerate(states):
        if state is None:
            continue
        k = index_of.get(id(state))
        if k is None:
            k = index_of[id(state)] = len(distinct)
            distinct.append(state)
        rows.append(r)
        sources.append(k)
    if not rows:
        return None
    device = torch.device(device) if device is not None else torch.device("cpu")
    compiler = distinct[0].grammar.compiler
    if any(s.grammar.compiler is not compiler for s in distinct):
        raise ValueError("build_allowed_mask: states of different GrammarCompilers in one batch")

    words = compiler.mask_words
    packed = torch.empty(len(distinct), words, dtype=torch.int32, pin_memory=device.type == "cuda")
    compiler._fill_packed(distinct, packed)
    width = min(compiler.vocab_size, vocab_size)
    guided = unpack_bitmask(packed.to(device, non_blocking=True), width)  # [D, width]

    if len(rows) == num_rows and len(distinct) == num_rows and width == vocab_size:
        return guided.contiguous()  # every row guided by its own state: the unpacked mask is the answer
    mask = torch.ones(num_rows, vocab_size, dtype=torch.bool, device=device)
    if len(rows) == num_rows and sources == list(range(num_rows)):
        mask[:, :width] = guided
        mask[:, width:] = False
        return mask
    row_index = torch.tensor(rows, dtype=torch.int64, device=device)
    if len(distinct) != len(rows) or sources != list(range(len(rows))):
        guided = guided.index_select(0, torch.tensor(sources, dtype=torch.int64, device=device))
    if width < vocab_size:
        guided = torch.cat([guided, guided.new_zeros(len(rows), vocab_size - width)], dim=1)
    mask.index_copy_(0, row_index, guided)
    return mask
