"""CUDA graphs for decode steps: captured once at start-up for a set of batch sizes, replayed with padded
inputs.

A decode step of B sequences replays the graph of the smallest captured size G >= B. Its inputs live in
static buffers: rows [0, B) hold the step's tokens; rows [B, G) are padding (slot -1, so nothing is written
to the cache, and sequence length 0, so attention reads nothing). The graph runs the whole model and the LM
head runs after it, on the real rows only, and so does sampling.

With ``shared_prefix_min_batch`` (a backend with a shared-prefix pass, which launches of that many rows and more
take), each such size has a second graph that runs the pass (``AttentionMetadata.shared_prefixes``), replayed only
for the steps whose rows form groups, so that steps without groups (every step at short prompts) run no idle pass
(BENCHMARKS, seventeenth session). The second set adds its capture to the start-up.
"""

from __future__ import annotations

import logging
import time

import torch

from rlserve.attention import AttentionMetadata, SharedPrefixes

logger = logging.getLogger(__name__)

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, max_batch: int, max_blocks_per_seq: int, max_model_len: int,
                 device: torch.device, shared_prefix_min_batch: int = 0):
        self.model = model
        self.device = device
        self.sizes = [s for s in CAPTURE_SIZES if s <= max_batch] or [max_batch]
        if self.sizes[-1] < max_batch:
            self.sizes.append(max_batch)
        g = self.sizes[-1]
        # Static inputs, filled on the device before each replay.
        self.input_ids = torch.zeros(g, dtype=torch.int64, device=device)
        self.positions = torch.zeros(g, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((g,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(g, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(g, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(g + 1, dtype=torch.int32, device=device)
        self.shared_prefix_min_batch = shared_prefix_min_batch  # 0: no shared-prefix graphs
        self.shared_prefixes = SharedPrefixes(torch.zeros(g, dtype=torch.int32, device=device),
                                              torch.zeros(g, dtype=torch.int32, device=device)) \
            if shared_prefix_min_batch else None
        self.max_model_len = max_model_len
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (size, runs the shared-prefix pass)
        self.hidden: dict[tuple[int, bool], torch.Tensor] = {}
        self.capture_seconds = 0.0

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _meta(self, g: int, shared: bool) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:g], query_start_loc=self.query_start_loc[:g + 1],
            seq_lens=self.seq_lens[:g], block_tables=self.block_tables[:g], num_decodes=g, max_query_len=1,
            max_seq_len=self.max_model_len, query_lens_cpu=[1] * g, seq_lens_cpu=[self.max_model_len] * g,
            shared_prefixes=self.shared_prefixes.rows(g) if shared else None)

    def _variants(self) -> list[tuple[int, bool]]:
        """(size, shared) of every graph, largest first: smaller graphs reuse the pool's memory."""
        variants = [(g, False) for g in self.sizes]
        if self.shared_prefix_min_batch:
            variants += [(g, True) for g in self.sizes if g >= self.shared_prefix_min_batch]
        return sorted(variants, reverse=True)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        # Captured on a stream of this engine's device, named: torch.cuda.graph's default capture stream is made
        # once per process, on whichever device was current then, and an engine on another device captured on it
        # fails ("operation not permitted when stream is capturing").
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.device(self.device):
            for g, shared in self._variants():
                meta = self._meta(g, shared)
                ids, pos = self.input_ids[:g], self.positions[:g]
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up: Triton compilation and autotuning happen outside the graph
                        self.model(ids, pos, meta)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    hidden = self.model(ids, pos, meta)
                self.graphs[g, shared] = graph
                self.hidden[g, shared] = hidden
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d decode CUDA graphs (batch %d..%d) in %.1fs", len(self.graphs), self.sizes[0],
                    self.sizes[-1], self.capture_seconds)

    def size_for(self, batch: int) -> int | None:
        for g in self.sizes:
            if g >= batch:
                return g
        return None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One decode step of B sequences (device tensors of B rows; ``meta`` a decode batch of them) -> hidden
        states [B, D], a view into the graph's output that stays valid until the next replay."""
        b = input_ids.shape[0]
        g = self.size_for(b)
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(meta.slot_mapping)
        self.seq_lens[:b].copy_(meta.seq_lens)
        self.block_tables[:b, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        shared = meta.shared_prefixes is not None and (g, True) in self.graphs
        if shared:
            for buffer, values in zip(self.shared_prefixes, meta.shared_prefixes):
                buffer[:b].copy_(values)
        if g > b:  # padding rows: write nothing, read nothing (and belong to no group)
            self.slot_mapping[b:g].fill_(-1)
            self.seq_lens[b:g].zero_()
            if shared:
                for buffer in self.shared_prefixes:
                    buffer[b:g].zero_()
        self.graphs[g, shared].replay()
        return self.hidden[g, shared][:b]
