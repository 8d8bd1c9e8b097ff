"""Tokenizer loading, incremental detokenization and stop-string search.

Text lives here, in the front ends, and in the engine core for stop strings only (engine/stop_strings.py).
"""

from __future__ import annotations

from pathlib import Path

REPLACEMENT_CHAR = "\ufffd"


def load_tokenizer(model_dir: str | Path, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir, revision=revision, trust_remote_code=trust_remote_code)


def render_chat(tokenizer, conversation: list[dict], chat_template_kwargs: dict | None = None,
                tools: list | None = None, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template."""
    text = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         **(chat_template_kwargs or {}))
    return tokenizer(text, add_special_tokens=False).input_ids


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, a piece at a time.

    Decoding each token alone breaks multi-byte characters and word-boundary spaces, so every step decodes a
    short window ending at the newest token and emits what it adds to the window's previous text, holding back
    a trailing incomplete character until the next token completes it.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-6:])  # a little prompt context for the first tokens' spacing
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.pieces: list[str] = []  # the text, as emitted: joined only when asked (appending to one str is O(n))
        self.num_chars = 0

    @property
    def text(self) -> str:
        if len(self.pieces) > 1:
            self.pieces = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    def tail(self, n: int) -> str:
        """The last ``n`` characters (fewer if the text is shorter), without joining the whole text."""
        taken, size = [], 0
        for piece in reversed(self.pieces):
            taken.append(piece)
            size += len(piece)
            if size >= n:
                break
        return "".join(reversed(taken))[-n:] if n > 0 else ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _window(self) -> tuple[str, str]:
        """The decoded window before the unemitted tokens, and with them."""
        return (self._decode(self.ids[self.prefix_offset:self.read_offset]),
                self._decode(self.ids[self.prefix_offset:]))

    def held_back(self) -> str:
        """The text ``add`` has not emitted yet: a trailing incomplete character (decoded as U+FFFD), or ""."""
        prefix, full = self._window()
        return full[len(prefix):] if len(full) > len(prefix) else ""

    def add(self, token_id: int) -> str:
        """Append one token; returns the new text (possibly empty)."""
        self.ids.append(token_id)
        prefix, full = self._window()
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.pieces.append(delta)
            self.num_chars += len(delta)
            return delta
        return ""


def find_stop_string(text: str, num_new_chars: int, stops: list[str]) -> tuple[str, int] | None:
    """The first stop string, in the order given, that ends within the last ``num_new_chars`` characters:
    (stop, start index) -- vLLM's rule. Each stop is looked for only where it could end in the new text, so a
    stop completed before (inside min_tokens, say) is not found later because a longer stop widened the
    window."""
    if not stops or not num_new_chars:
        return None
    for stop in stops:
        at = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
        if at != -1:
            return stop, at
    return None
