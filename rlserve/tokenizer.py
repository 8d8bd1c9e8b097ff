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
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; returns the new text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""


def find_stop_string(text: str, num_new_chars: int, stops: list[str]) -> tuple[str, int] | None:
    """The earliest stop string that ends within the last ``num_new_chars`` characters: (stop, start index)."""
    if not stops or not num_new_chars:
        return None
    longest = max(len(s) for s in stops)
    begin = max(0, len(text) - num_new_chars - longest + 1)
    best = None
    for stop in stops:
        at = text.find(stop, begin)
        if at != -1 and (best is None or at < best[1]):
            best = (stop, at)
    return best
