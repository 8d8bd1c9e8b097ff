"""Tiny random models of every supported family, with a byte-level tokenizer, made on the fly.

``make_tiny_model(path, family)`` writes an ordinary Hugging Face model directory (config.json,
generation_config.json, model.safetensors, tokenizer files with a chat template), so that rlserve, Hugging
Face transformers and the demo all load it the usual way, with no network.

The tokenizer maps byte ``b`` to token id ``b`` and adds three special tokens after the 256 bytes:
``<|endoftext|>`` (256), ``<|im_start|>`` (257) and ``<|im_end|>`` (258); both 256 and 258 end generation.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BYTE_VOCAB = 256 + len(SPECIAL_TOKENS)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 256, 257, 258

CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small enough for a CPU test in seconds; initializer_range is large so that logits are well separated and
# greedy decoding is not decided by float rounding.
TINY_DEFAULTS = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=256, max_position_embeddings=2048, initializer_range=0.2)


def _byte_chars() -> list[str]:
    """The printable stand-in character for each byte, as byte-level BPE tokenizers use (GPT-2's table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def make_byte_tokenizer():
    """A Hugging Face fast tokenizer: one token per byte, plus the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_chars())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))  # ids 256, 257, 258 in this order
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, chat_template=CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                  "additional_special_tokens": ["<|im_start|>"]})
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == [ENDOFTEXT_ID, IM_START_ID, IM_END_ID], ids
    return tokenizer


def tiny_config(family: str = "qwen2", **overrides):
    """A transformers config for a tiny model of ``family``; ``overrides`` replace any field."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    values = dict(TINY_DEFAULTS, vocab_size=BYTE_VOCAB, tie_word_embeddings=family in ("qwen2", "qwen3"),
                  eos_token_id=[IM_END_ID, ENDOFTEXT_ID], pad_token_id=ENDOFTEXT_ID, bos_token_id=None)
    if family == "llama":
        values["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
        values["rope_theta"] = 500000.0
    if family == "qwen3":
        values["head_dim"] = 64  # not hidden_size / heads, as in real Qwen3 models
    values.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    config = cls(**values)
    config.architectures = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                             "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]]
    return config


def make_tiny_model(path: str | Path, family: str = "qwen2", seed: int = 0, dtype: torch.dtype = torch.float32,
                    with_weights: bool = True, **overrides) -> Path:
    """Write a random ``family`` model and the byte tokenizer to ``path``; returns the path.

    ``with_weights=False`` writes the config and tokenizer only, for engines started with random weights
    (``load_format="dummy"``), which saves writing gigabytes for benchmark-sized models."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(family, **overrides)
    if with_weights:
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(path)
    else:
        config.dtype = dtype
        config.save_pretrained(path)
    GenerationConfig(eos_token_id=[IM_END_ID, ENDOFTEXT_ID], pad_token_id=ENDOFTEXT_ID).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path
