"""The model runner: turns a scheduled step into flat tensors, runs the model, samples.

It owns the model, the KV cache tensor and the attention backend. It knows nothing of requests beyond what a
``SchedulerOutput`` carries, and nothing of HTTP or text.

Per step: copy-on-write block copies → inputs (token ids, positions, slot mapping, block tables, sequence
lengths; decodes first) → forward → logits of the rows that sample → sampler → one host sync to return the
tokens.
"""

from __future__ import annotations

import logging
import time

import torch

from rlserve.attention import AttentionMetadata, get_backend
from rlserve.config import EngineConfig, RuntimeInfo
from rlserve.engine.sampler import SamplingBatch, sample
from rlserve.engine.scheduler import SampledToken, ScheduledSeq, SchedulerOutput
from rlserve.engine.sequence import Sequence, mix64

logger = logging.getLogger(__name__)

_TWO_POW_53 = float(2 ** 53)


def sample_seed(seq: Sequence, sample_index: int) -> int:
    """The random stream of a request's sample ``sample_index`` (a forking parent draws for its children)."""
    if sample_index == seq.sample_index:
        return seq.rng_seed
    return mix64(seq.request.seed ^ mix64(sample_index))


def uniform_for(seed: int, position: int) -> float:
    """A uniform number in (0, 1) from (stream seed, output position): counter-based, batch-independent."""
    bits = mix64(seed ^ mix64(position + 0x5DEECE66D)) >> 11
    return (bits + 0.5) / _TWO_POW_53


class ModelRunner:
    def __init__(self, config: EngineConfig, info: RuntimeInfo, model: torch.nn.Module, num_kv_blocks: int,
                 attention_backend: str = "auto"):
        self.config = config
        self.info = info
        self.model = model
        self.device = info.device
        self.block_size = info.block_size
        self.backend = get_backend(attention_backend, self.device)
        self.kv_cache = self._allocate_kv_cache(num_kv_blocks)
        self.num_steps = 0

    # -- KV cache ----------------------------------------------------------------------------------
    @staticmethod
    def kv_block_bytes(info: RuntimeInfo, dtype: torch.dtype) -> int:
        element = torch.tensor([], dtype=dtype).element_size()
        return 2 * info.num_layers * info.block_size * info.num_kv_heads * info.head_dim * element

    def _allocate_kv_cache(self, num_blocks: int) -> torch.Tensor:
        layers = self.model.attention_layers
        attn = layers[0]
        # [K/V, layer, block, slot, kv head, head dim]
        kv = torch.zeros(2, len(layers), num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim,
                         dtype=self.info.dtype, device=self.device)
        for i, layer in enumerate(layers):
            layer.bind(kv[0, i], kv[1, i], self.backend)
        return kv

    def reallocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.kv_cache = self._allocate_kv_cache(num_blocks)

    @torch.inference_mode()
    def profile_free_memory(self, gpu_memory_utilization: float) -> int:
        """Bytes the KV cache may take: run the largest step the scheduler can produce (every token of the
        budget, logits and top logprobs for the most sequences) and keep what its peak leaves under
        ``gpu_memory_utilization`` of the card."""
        num_tokens = self.info.max_num_batched_tokens
        num_seqs = min(self.info.max_num_seqs, num_tokens)
        per_seq = num_tokens // num_seqs
        num_blocks = num_seqs * -(-per_seq // self.block_size)
        self.reallocate_kv_cache(num_blocks)
        torch.cuda.reset_peak_memory_stats()
        input_ids, positions, meta = self._dummy_batch(num_seqs, per_seq)
        hidden = self.model(input_ids, positions, meta)
        logits = self.model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1])
        torch.log_softmax(logits, dim=-1).topk(self.config.max_logprobs, dim=-1)
        torch.cuda.synchronize()
        kv_bytes = self.kv_cache.numel() * self.kv_cache.element_size()
        peak_without_kv = torch.cuda.max_memory_allocated() - kv_bytes
        del hidden, logits
        self.kv_cache = None
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        non_torch = total - free - torch.cuda.memory_reserved()
        graph_reserve = 0 if self.config.enforce_eager else 512 * 2**20
        budget = total * gpu_memory_utilization - peak_without_kv - non_torch - graph_reserve
        logger.info("memory profile: peak %.2f GiB without KV, %.2f GiB outside torch, KV budget %.2f GiB",
                    peak_without_kv / 2**30, non_torch / 2**30, budget / 2**30)
        return int(max(budget, 0))

    def _dummy_batch(self, num_seqs: int, tokens_per_seq: int):
        """A prefill of ``num_seqs`` sequences of ``tokens_per_seq`` tokens each, over blocks 0, 1, 2, ..."""
        dev, bs = self.device, self.block_size
        blocks_per_seq = -(-tokens_per_seq // bs)
        tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32, device=dev).view(num_seqs, -1)
        pos = torch.arange(tokens_per_seq, device=dev)
        slots = (tables.long()[:, pos // bs] * bs + pos % bs).flatten()
        positions = pos.repeat(num_seqs)
        lens = [tokens_per_seq] * num_seqs
        meta = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=torch.arange(0, (num_seqs + 1) * tokens_per_seq, tokens_per_seq, dtype=torch.int32,
                                         device=dev),
            seq_lens=torch.full((num_seqs,), tokens_per_seq, dtype=torch.int32, device=dev),
            block_tables=tables, num_decodes=num_seqs if tokens_per_seq == 1 else 0,
            max_query_len=tokens_per_seq, max_seq_len=tokens_per_seq, query_lens_cpu=lens, seq_lens_cpu=lens)
        input_ids = torch.zeros(num_seqs * tokens_per_seq, dtype=torch.int64, device=dev)
        return input_ids, positions, meta

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    # -- one step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> list[list[SampledToken]]:
        if self.config.fail_after_steps is not None and self.num_steps >= self.config.fail_after_steps:
            raise RuntimeError(f"injected failure after {self.num_steps} steps (fail_after_steps)")
        self.num_steps += 1
        self.copy_blocks(sched.block_copies)
        order = sorted(range(len(sched.scheduled)), key=lambda i: sched.scheduled[i].num_new_tokens != 1)
        items = [sched.scheduled[i] for i in order]
        input_ids, positions, meta, sample_rows = self._prepare_inputs(items)
        hidden = self.model(input_ids, positions, meta)
        sampling_items = [item for item in items if item.samples]
        results: list[list[SampledToken]] = [[] for _ in items]
        if sampling_items:
            logits = self.model.compute_logits(hidden[sample_rows])
            batch = self._prepare_sampling(sampling_items, logits.shape[-1])
            out = sample(logits, batch)
            drawn = self._to_host(out)
            row = 0
            for pos, item in enumerate(items):
                if item.samples:
                    count = item.seq.num_samples_to_draw
                    results[pos] = [_trim(t, item.seq.params.logprobs) for t in drawn[row:row + count]]
                    row += count
        unsorted: list[list[SampledToken]] = [[] for _ in items]
        for pos, original in enumerate(order):
            unsorted[original] = results[pos]
        return unsorted

    def _prepare_inputs(self, items: list[ScheduledSeq]):
        bs = self.block_size
        input_ids, positions, slots, query_lens, seq_lens, sample_rows = [], [], [], [], [], []
        num_decodes = 0
        for item in items:
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            input_ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            query_lens.append(n)
            seq_lens.append(start + n)
            num_decodes += n == 1
            if item.samples:
                sample_rows.append(len(input_ids) - 1)
        max_blocks = max(len(item.seq.block_table) for item in items)
        tables = [item.seq.block_table + [0] * (max_blocks - len(item.seq.block_table)) for item in items]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            num_decodes=num_decodes, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        return (torch.tensor(input_ids, dtype=torch.int64, device=dev),
                torch.tensor(positions, dtype=torch.int64, device=dev), meta,
                torch.tensor(sample_rows, dtype=torch.int64, device=dev))

    def _prepare_sampling(self, items: list[ScheduledSeq], vocab_size: int) -> SamplingBatch:
        logits_index, temperature, greedy, uniform = [], [], [], []
        top_k, top_p, min_p, rep, pres, freq, raw = [], [], [], [], [], [], []
        banned_rows, banned_ids, penalty_rows = [], [], []
        max_logprobs = -1
        for r, item in enumerate(items):
            seq = item.seq
            p = seq.params
            for k in range(seq.num_samples_to_draw):
                index = seq.sample_index if seq.num_samples_to_draw == 1 else k
                row = len(logits_index)
                logits_index.append(r)
                greedy.append(p.is_greedy)
                temperature.append(1.0 if p.is_greedy else p.temperature)
                uniform.append(uniform_for(sample_seed(seq, index), seq.num_output_tokens))
                top_k.append(p.top_k if p.top_k > 0 else vocab_size)
                top_p.append(p.top_p)
                min_p.append(p.min_p)
                rep.append(p.repetition_penalty)
                pres.append(p.presence_penalty)
                freq.append(p.frequency_penalty)
                raw.append(p.logprobs_mode == "raw")
                if p.logprobs is not None:
                    max_logprobs = max(max_logprobs, p.logprobs)
                if seq.num_output_tokens < p.min_tokens:
                    stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.info.eos_token_ids))
                    for t in stop_ids:
                        if t < vocab_size:
                            banned_rows.append(row)
                            banned_ids.append(t)
                if p.uses_penalties:
                    penalty_rows.append((row, seq))
        dev = self.device
        num_rows = len(logits_index)
        batch = SamplingBatch(
            logits_index=torch.tensor(logits_index, dtype=torch.int64, device=dev),
            temperature=torch.tensor(temperature, dtype=torch.float32, device=dev),
            is_greedy=torch.tensor(greedy, dtype=torch.bool, device=dev),
            uniform=torch.tensor(uniform, dtype=torch.float32, device=dev),
            all_greedy=all(greedy), any_greedy=any(greedy), max_num_logprobs=max_logprobs,
            needs_gather=num_rows != len(items))
        if any(k < vocab_size for k in top_k):
            batch.top_k = torch.tensor(top_k, dtype=torch.int64, device=dev)
        if any(p < 1.0 for p in top_p):
            batch.top_p = torch.tensor(top_p, dtype=torch.float32, device=dev)
        if any(p > 0.0 for p in min_p):
            batch.min_p = torch.tensor(min_p, dtype=torch.float32, device=dev)
        if any(raw):
            batch.raw_logprob_rows = torch.tensor(raw, dtype=torch.bool, device=dev)
        if banned_rows:
            batch.banned = (torch.tensor(banned_rows, device=dev), torch.tensor(banned_ids, device=dev))
        if penalty_rows:
            counts = torch.zeros(num_rows, vocab_size, dtype=torch.float32)
            prompt_mask = torch.zeros(num_rows, vocab_size, dtype=torch.bool)
            for row, seq in penalty_rows:
                out = torch.tensor(seq.output_token_ids, dtype=torch.int64)
                if len(out):
                    counts[row].index_add_(0, out, torch.ones(len(out)))
                prompt_mask[row, torch.tensor(seq.token_ids[:seq.num_prompt_tokens])] = True
            batch.output_counts = counts.to(dev)
            batch.prompt_mask = prompt_mask.to(dev)
            batch.repetition_penalty = torch.tensor(rep, dtype=torch.float32, device=dev)
            batch.presence_penalty = torch.tensor(pres, dtype=torch.float32, device=dev)
            batch.frequency_penalty = torch.tensor(freq, dtype=torch.float32, device=dev)
        return batch

    @staticmethod
    def _to_host(out) -> list[SampledToken]:
        token_ids = out.token_ids.tolist()  # the step's one host sync
        if out.logprobs is None:
            return [SampledToken(t) for t in token_ids]
        logprobs = out.logprobs.tolist()
        if out.top_ids is None:
            return [SampledToken(t, lp) for t, lp in zip(token_ids, logprobs)]
        top_ids, top_lps = out.top_ids.tolist(), out.top_logprobs.tolist()
        return [SampledToken(t, lp, list(zip(ids, lps)))
                for t, lp, ids, lps in zip(token_ids, logprobs, top_ids, top_lps)]


def _trim(token: SampledToken, num_logprobs: int | None) -> SampledToken:
    """Keep what the request asked for: the batch computes the most any row wants."""
    if num_logprobs is None:
        return SampledToken(token.token_id)
    if token.top is not None:
        token.top = token.top[:num_logprobs] if num_logprobs > 0 else None
    return token
