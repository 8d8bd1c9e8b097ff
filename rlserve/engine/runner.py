"""The model runner: turns a scheduled step into flat tensors, runs the model, samples.

It owns the model, the KV cache tensor and the attention backend. It knows nothing of requests beyond what a
``SchedulerOutput`` carries, and nothing of HTTP or text.

Per step: copy-on-write block copies → inputs (token ids, positions, slot mapping, block tables, sequence
lengths; decodes first) → forward (a CUDA-graph replay for decode batches on GPU) → logits of the rows that
sample → sampler (one draw rule per device; when no row needs more than temperature, the model's logits go
straight to the GPU draw kernel) → one host sync to return the tokens. A multi-step launch (``multi_step.py``)
repeats forward and draw on the device, each step's tokens the next one's inputs, before that one sync. A step
that computes a prompt whose logprobs were asked for also scores its prompt positions (``prompt_logprobs.py``).

Block tables live on the device, one row per running sequence, and are updated only where a sequence's
table changed; each step gathers its rows. Slots are computed on the device from them.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import weakref
from dataclasses import dataclass, field

import torch

from rlserve.attention import AttentionMetadata, SharedPrefixes, get_backend
from rlserve.attention.metadata import plan_shared_prefixes
from rlserve.config import EngineConfig, RuntimeInfo
from rlserve.distributed.parallel import SINGLE, TensorParallel
from rlserve.engine import prompt_logprobs
from rlserve.engine.async_step import must_apply_first
from rlserve.engine.penalty_state import PenaltyState
from rlserve.engine.sampler import (SamplerOutput, SamplingBatch, concat_outputs, is_simple, sample, slice_rows,
                                    worst_case_batch)
from rlserve.engine.sampling_batch import batch_to_device, prepare_sampling
from rlserve.engine.scheduler import ScheduledSeq, SchedulerOutput, StepResult
from rlserve.engine.sequence import Sequence
from rlserve.layers import fused
from rlserve.sampling import MAX_PROMPT_LOGPROBS

logger = logging.getLogger(__name__)


@dataclass
class StepInput:
    """One step as plain lists (picklable): all a tensor-parallel rank needs to run the same forward."""
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # block-table row of each sequence
    sample_rows: list[int] = field(default_factory=list)  # token index of each sampling sequence's last token
    num_decodes: int = 0
    table_writes: list[tuple[int, int, int]] = field(default_factory=list)  # (row, column, block)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    prompt_logprobs: prompt_logprobs.PromptLogprobsInput | None = None  # prompt positions to score
    # Async scheduling: token indices whose input is the previous step's draw, still on the device, and that
    # draw's row in it (rank 0 reads those; the other ranks receive the tokens from rank 0).
    ahead_index: list[int] = field(default_factory=list)
    ahead_rows: list[int] = field(default_factory=list)
    # A multi-step launch (multi_step.py): its decode steps, and each row's kept draws when one keeps fewer.
    num_steps: int = 1
    burst_kept: list[int] = field(default_factory=list)
    # Decode rows that share a prefix (metadata.plan_shared_prefixes), when the backend reads one once a group and
    # some group formed: each decode row's shared prefix length and, at a group's first row, its size.
    shared_prefix_lens: list[int] = field(default_factory=list)
    shared_group_sizes: list[int] = field(default_factory=list)


@dataclass
class LaunchedStep:
    """A step whose forward and draws are on their way on the device; ``ModelRunner.collect`` makes its result.
    ``draws``: on the device, or, under async scheduling on CUDA, host copies in flight until ``copied``."""
    draws: SamplerOutput | None  # None: no row sampled
    first_row: list[int]
    failed: dict[int, str]
    scored: tuple | None  # prompt logprobs' (values, ids) on the device
    prompt_logprobs: prompt_logprobs.PromptLogprobsInput | None
    copied: object | None = None  # a torch.cuda.Event recorded after the host copies
    num_steps: int = 1  # a multi-step launch: ``draws`` holds its steps one after the other


class ModelRunner:
    def __init__(self, config: EngineConfig, info: RuntimeInfo, model: torch.nn.Module, num_kv_blocks: int,
                 attention_backend: str = "auto", tp: TensorParallel = SINGLE):
        self.config = config
        self.tp = tp
        self.info = info
        self.model = model
        self.device = info.device
        self.block_size = info.block_size
        self.backend = get_backend(attention_backend, self.device)
        # Decode groups that read a shared prefix once (the backend's pass; 0 members: none): at most as many rows
        # as fit the pass's tile, sharing at least config.shared_prefix_min_tokens (in whole blocks), planned for
        # decode batches of at least shared_prefix_min_batch rows (smaller ones would ignore the plan).
        layer = model.attention_layers[0]
        self.max_shared_prefix_members = 0
        if config.shared_prefix_min_tokens > 0:
            self.max_shared_prefix_members = self.backend.shared_prefix_rows // (layer.num_heads // layer.num_kv_heads)
        self.shared_prefix_min_blocks = -(-config.shared_prefix_min_tokens // self.block_size)
        self.shared_prefix_min_batch = 0  # 0: never
        if self.max_shared_prefix_members > 1:
            self.shared_prefix_min_batch = max(2, self.backend.shared_prefix_min_batch(layer.num_kv_heads,
                                                                                       self.device))
        self.kv_cache = self._allocate_kv_cache(num_kv_blocks)
        # Kernel choice, made here once (before profiling and graph capture) and applied to the model's layers.
        self.use_fused_kernels = config.fused_kernels and fused.enabled(self.device, info.dtype)
        fused.use_fused_kernels(model, self.use_fused_kernels, fuse_kv_store=self.backend.name == "triton")
        self.num_steps = 0
        self.graphs = None  # DecodeGraphs, once captured
        self.broadcast_step = None  # set under tensor parallelism: sends each step to the other ranks
        self.gumbel_sample = _gumbel_sampler(self.device)  # the draw rule of every row (sampler.py)
        self.profiled_peak_bytes: int | None = None  # CUDA: a step's peak without the KV cache (profiled)
        # Device block tables: row r holds the table of the sequence that owns it. The scheduler runs at most
        # max_num_seqs sequences, and a sequence gives its row back when it finishes or is preempted.
        self.max_blocks_per_seq = -(-info.max_model_len // info.block_size)
        self.num_rows = info.max_num_seqs
        self.block_tables = torch.zeros(self.num_rows, self.max_blocks_per_seq, dtype=torch.int32,
                                        device=self.device)
        self.row_of: dict[int, int] = {}  # seq_id -> row
        self.free_rows = list(range(self.num_rows - 1, -1, -1))
        self.synced: dict[int, tuple[list[int], int, int]] = {}  # seq_id -> (table object, length, last)
        self._staging: torch.Tensor | None = None  # pinned host buffer for the step's inputs
        self._staging_event = None
        # Penalised sequences' token counts, kept on the device across steps (slots live as long as the rows).
        self.penalties = PenaltyState(info.max_num_seqs, info.max_model_len, self.device)
        # Async scheduling: the last launched step's drawn tokens on the device, and each drawing sequence's row.
        self._draws: torch.Tensor | None = None
        self._draw_row: dict[int, int] = {}  # seq_id -> row of _draws
        # Build host-to-device inputs in pinned memory, copied without a wait (see _upload), and where they start.
        self.async_scheduling = config.resolved_async_scheduling()
        self._uploads_ahead = self.async_scheduling and self.device.type == "cuda"
        if self.async_scheduling:
            # Through a weak proxy: bound methods here would make runner <-> penalties a cycle, and the runner's
            # GPU memory would wait for the garbage collector after the last reference to the engine goes.
            me = weakref.proxy(self)
            self.penalties.pending_draws = lambda seqs: me._pending_draws(seqs)
            # pinned, without a wait on CUDA (sync mode: as it always was)
            self.penalties.upload = lambda values: me._upload(values)
        self._host = torch.device("cpu")

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

    def _release_kv_cache(self) -> None:
        """Drop the cache with the layers' views of it (the views alone would keep its memory)."""
        for layer in self.model.attention_layers:
            layer.k_cache = layer.v_cache = None
        self.kv_cache = None

    def reallocate_kv_cache(self, num_blocks: int) -> None:
        self._release_kv_cache()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.kv_cache = self._allocate_kv_cache(num_blocks)

    @torch.inference_mode()
    def profile_free_memory(self, gpu_memory_utilization: float) -> int:
        """Bytes the KV cache may take: run the largest step the scheduler can produce (every token of the
        budget, logits for the most sequences, a chunk of prompt logprobs, then the sampler with every stage on
        max_num_seqs rows -- the most it draws at once) and keep what its peak leaves under
        ``gpu_memory_utilization`` of the card, as in vLLM: the fraction is this engine's share.

        What others in this process hold on the device (another engine, a trainer's tensors) is not charged to
        this engine's share. A share that does not fit beside them is refused, as vLLM refuses a share larger
        than the free memory: taking what is left would leave the others no room for their own next steps.
        (Other processes' memory is still taken off the share, as before: that part is not vLLM's meaning.)
        Measured with the others idle: start engines while nothing else on the device allocates or frees."""
        num_tokens = self.info.max_num_batched_tokens
        num_seqs = min(self.info.max_num_seqs, num_tokens)
        per_seq = num_tokens // num_seqs
        num_blocks = num_seqs * -(-per_seq // self.block_size)
        gc.collect()  # others' garbage freed now, not in the middle of the profile (it would hide in the peak) ...
        gc_was_enabled = gc.isenabled()
        gc.disable()  # ... nor by an automatic collection during it
        try:
            return self._profile(gpu_memory_utilization, num_seqs, per_seq, num_blocks)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _profile(self, gpu_memory_utilization: float, num_seqs: int, per_seq: int, num_blocks: int) -> int:
        self.reallocate_kv_cache(num_blocks)
        device = self.device
        kv_bytes = self.kv_cache.numel() * self.kv_cache.element_size()
        torch.cuda.synchronize(device)
        others = max(torch.cuda.memory_allocated(device) - self._weight_bytes() - kv_bytes, 0)
        torch.cuda.reset_peak_memory_stats(device)
        # The penalty state lives across steps, through the forward too: it is held from the start.
        self.penalties.allocate(self.info.vocab_size)
        input_ids, positions, meta = self._dummy_batch(num_seqs, per_seq)
        hidden = self.model(input_ids, positions, meta)
        logits = self.model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1])  # [num_seqs, V]
        # One chunk of prompt logprobs at the largest K (its [rows, vocab] fp32 temporaries).
        rows = min(prompt_logprobs.CHUNK_ROWS, hidden.shape[0])
        k = min(MAX_PROMPT_LOGPROBS, self.info.vocab_size)
        scoring = prompt_logprobs.PromptLogprobsInput(list(range(rows)), [0] * rows, [rows], [1.0], [k])
        prompt_logprobs.score(self.model, hidden, prompt_logprobs.to_device(scoring, self.device))
        del hidden
        if logits.shape[-1] != self.info.vocab_size:
            self.penalties.allocate(logits.shape[-1])
        batch = worst_case_batch(self.info.max_num_seqs, num_seqs, logits.shape[-1],
                                 self.config.logprobs_limit(logits.shape[-1]), self.device,
                                 (self.penalties.counts, self.penalties.seen))
        out = self._sample(logits, batch)
        torch.cuda.synchronize(device)
        # This engine's peak: weights, the largest step's temporaries (and the trial KV cache, taken off)
        peak_without_kv = torch.cuda.max_memory_allocated(device) - others - kv_bytes
        self.profiled_peak_bytes = peak_without_kv
        del logits, batch, out
        self.penalties.free_buffers()  # allocated again by the first penalised sequence, in the room kept here
        self._release_kv_cache()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        non_torch = total - free - torch.cuda.memory_reserved(device)  # CUDA contexts, NCCL, other processes
        transient = peak_without_kv - (torch.cuda.memory_allocated(device) - others)
        graph_reserve = 0 if self.config.enforce_eager else 512 * 2**20
        budget = total * gpu_memory_utilization - peak_without_kv - non_torch - graph_reserve
        # budget - (free - transient - graph_reserve) = held - (1 - share) * total: the share fits beside what
        # others hold, with the allocator's cached but unused bytes (their graph pools, fragmentation).
        held = others + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if held > (1.01 - gpu_memory_utilization) * total:
            raise ValueError(
                f"gpu_memory_utilization {gpu_memory_utilization} asks for {total * gpu_memory_utilization / 2**30:.1f}"
                f" GiB of the card's {total / 2**30:.1f} GiB, but others in this process hold {held / 2**30:.1f} GiB"
                f" of it: at most {max(1 - held / total, 0):.2f} fits beside them")
        budget = min(budget, free - transient - graph_reserve)  # alone, binds only at a share near 1
        logger.info("memory profile: peak %.2f GiB without KV, %.2f GiB outside torch, %.2f GiB held by others "
                    "in this process, KV budget %.2f GiB", peak_without_kv / 2**30, non_torch / 2**30,
                    others / 2**30, budget / 2**30)
        return int(max(budget, 0))

    def _weight_bytes(self) -> int:
        """Bytes of this model's parameters and buffers on the device (tied weights counted once)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in itertools.chain(self.model.parameters(), self.model.buffers()) if t.device == self.device}
        return sum(storages.values())

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
        if tokens_per_seq == 1 and self.shared_prefix_min_batch:  # the shared-prefix pass's scratch, profiled
            meta.shared_prefixes = SharedPrefixes(torch.zeros(num_seqs, dtype=torch.int32, device=dev),
                                                  torch.zeros(num_seqs, dtype=torch.int32, device=dev))
        input_ids = torch.zeros(num_seqs * tokens_per_seq, dtype=torch.int64, device=dev)
        return input_ids, positions, meta

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = self._upload([s for s, _ in copies])
        dst = self._upload([d for _, d in copies])
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def capture_cuda_graphs(self) -> None:
        if self.device.type != "cuda" or self.config.enforce_eager or not self.backend.supports_cuda_graphs:
            return
        from rlserve.engine.cuda_graphs import DecodeGraphs
        self.graphs = DecodeGraphs(self.model, self.info.max_num_seqs, self.max_blocks_per_seq,
                                   self.info.max_model_len, self.device,
                                   shared_prefix_min_batch=self.shared_prefix_min_batch)
        self.graphs.capture()

    def release_cuda_graphs(self) -> None:
        """Finish the device's work and destroy the captured decode graphs. Tensor parallelism calls this before
        it tears down its NCCL group: graphs that captured the group's all-reduces hold the communicator's
        resources, and NCCL's teardown then waits for them -- rank 0's hung until its timeout on 2 x H200."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.graphs is not None:
            self.graphs = None
            # A graph is destroyed when its last reference goes: in a cycle, by a collection -- which skips what the
            # process froze at start-up (debug.freeze_startup_heap), the graphs included. Unfreeze first: this
            # is the process's teardown, nothing is lost by it.
            from rlserve.debug import froze_startup_heap
            if froze_startup_heap():
                gc.unfreeze()
            gc.collect()

    def free_device_memory(self) -> None:
        """Give back the device memory this runner holds -- decode graphs, KV cache, weights -- when a single-process
        engine shuts down, so that ``LLM.shutdown()`` (or leaving ``with LLM(...)``) frees the GPU for the next
        engine without waiting for the garbage collector: the layers hold views of the KV cache and the runner
        sits in reference cycles. The runner is unusable after it."""
        if self.model is None:
            return
        self.release_cuda_graphs()
        self.model = self.kv_cache = self._staging = self._draws = None
        self.block_tables = self.penalties = None
        from rlserve.debug import froze_startup_heap
        if froze_startup_heap():  # a replica froze its start-up heap, the model's cycles among it (see above)
            gc.unfreeze()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- block-table rows --------------------------------------------------------------------------
    def _row(self, seq: Sequence, pending: list[tuple[int, int, int]]) -> int:
        """The device row of a sequence's block table; queues (row, column, block) writes for what changed."""
        row = self.row_of.get(seq.seq_id)
        if row is None:
            row = self.row_of[seq.seq_id] = self._take_row()
            self.synced.pop(seq.seq_id, None)
        table = seq.block_table
        synced = self.synced.get(seq.seq_id)
        if synced is not None and synced[0] is table and synced[1] == len(table) and synced[2] == table[-1]:
            return row
        # Tables only grow at the end or have their last computed block replaced (copy-on-write); a new table
        # object (after a preemption) is pushed whole.
        first = 0 if synced is None or synced[0] is not table else max(min(synced[1], len(table)) - 1, 0)
        pending += [(row, col, table[col]) for col in range(first, len(table))]
        self.synced[seq.seq_id] = (table, len(table), table[-1])
        return row

    def _take_row(self) -> int:
        if not self.free_rows:
            raise RuntimeError(f"no free block-table row: more than max_num_seqs ({self.num_rows}) sequences "
                               f"hold one (a sequence ended without release())")
        return self.free_rows.pop()

    def release(self, seqs) -> None:
        """Forget finished or preempted sequences' rows (and penalty slots)."""
        self.penalties.release(seqs)
        for seq in seqs:
            row = self.row_of.pop(seq.seq_id, None)
            self.synced.pop(seq.seq_id, None)
            if row is not None:
                self.free_rows.append(row)

    # -- one step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        return self.collect(self.launch(sched))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> LaunchedStep:
        """Run a step up to its draws, without waiting for the device."""
        scheduled = sched.scheduled
        order = [i for i, item in enumerate(scheduled) if item.num_new_tokens == 1]  # decodes first, in order
        if len(order) < len(scheduled):
            order += [i for i, item in enumerate(scheduled) if item.num_new_tokens != 1]
        items = [scheduled[i] for i in order]
        step = self.build_step(items, sched.block_copies)
        if sched.prompt_logprobs is not None:
            flat_start = dict(zip(items, itertools.accumulate(step.query_lens, initial=0)))
            step.prompt_logprobs = prompt_logprobs.plan(sched.prompt_logprobs,
                                                        [flat_start[item] for item in sched.prompt_logprobs])
        if sched.num_steps > 1:
            return self._launch_burst(sched, items, step)
        if self.broadcast_step is not None:  # tensor parallel: the other ranks run the same forward
            self.broadcast_step(step)
        logits, scored = self.forward(step)
        first_row = [-1] * len(items)
        if logits is None:
            return LaunchedStep(None, first_row, {}, scored, step.prompt_logprobs)
        sampling_items = [item for item in items if item.samples]
        # Async scheduling on CUDA: a step that runs ahead builds its sampling batch on the host and moves it
        # through pinned memory (no wait for the step in flight). A fallback step (guided rows, a prompt's first
        # draw, prompt logprobs: ``async_step.must_apply_first``) is applied before the next one anyway: its batch
        # is built on the device as in sync mode -- a guided step's allowed-token mask then crosses packed, not as
        # [S, V] bytes unpacked on the host.
        ahead = self._uploads_ahead and not must_apply_first(sched)
        batch = prepare_sampling(sampling_items, logits.shape[-1], self.info.eos_token_ids,
                                 self._host if ahead else self.device, self.penalties)
        if ahead:
            batch = batch_to_device(batch, self.device)
        draws = self._sample(logits, batch)
        failed = {}
        row = k = 0
        for pos, item in zip(order, items):  # rows follow the sorted order; report them in the original
            if item.samples:
                first_row[pos] = row
                row += 1 if item.seq.request.is_forked else item.seq.request.params.n  # num_samples_to_draw
                if k in batch.failed_items:
                    failed[pos] = batch.failed_items[k]
                k += 1
        launched = LaunchedStep(draws, first_row, failed, scored, step.prompt_logprobs)
        if self.async_scheduling:
            self._keep_draws(sched, launched)
        return launched

    def _launch_burst(self, sched: SchedulerOutput, items: list[ScheduledSeq], step: StepInput) -> LaunchedStep:
        """A multi-step launch (``multi_step.py``): ``sched.num_steps`` decode steps of the same sequences, one row
        each, back to back on the device (``_burst``); each step draws with the seeds of its output position. Under
        tensor parallelism the other ranks run the same steps (``follow_burst``), receiving each step's tokens.
        The draws come back as one [num_steps * S] column."""
        steps = step.num_steps = sched.num_steps
        if min(sched.burst_draws) < steps:
            step.burst_kept = sched.burst_draws
        assert step.prompt_logprobs is None, "a burst never scores a prompt (multi_step.plan_burst)"
        if self.broadcast_step is not None:  # tensor parallel: the other ranks run the same steps
            self.broadcast_step(step)
        batch, draws, error = None, [], None

        def draw(k: int, logits: torch.Tensor) -> torch.Tensor:
            nonlocal batch, error
            if error is None:
                try:
                    if batch is None:  # as launch builds it; a burst is never a fallback step (must_apply_first)
                        batch = prepare_sampling(items, logits.shape[-1], self.info.eos_token_ids,
                                                 self._host if self._uploads_ahead else self.device, self.penalties,
                                                 num_steps=steps)
                        if self._uploads_ahead:
                            batch = batch_to_device(batch, self.device)
                    draws.append(self._sample(logits, dataclasses.replace(batch, seeds=batch.step_seeds[k])))
                except Exception as e:
                    if self.tp.size == 1:
                        raise
                    error = e
                else:
                    return self.tp.broadcast_from_first(draws[-1].token_ids)
            # Drawing failed on rank 0 under tensor parallelism: the other ranks run the whole burst regardless, so
            # this one keeps their collectives paired to its end (zeros for tokens), then raises.
            return self.tp.broadcast_from_first(torch.zeros(len(items), dtype=torch.int64, device=self.device))

        self._burst(step, draw)
        if error is not None:
            raise error
        first_row = list(range(len(items)))  # every item a decode, in order (launch sorts nothing)
        launched = LaunchedStep(concat_outputs(draws), first_row, dict(batch.failed_items), None, None,
                                num_steps=steps)
        if self.async_scheduling:
            self._keep_draws(sched, launched)
        return launched

    @torch.inference_mode()
    def follow_burst(self, step: StepInput) -> None:
        """A tensor-parallel rank other than the first in a multi-step launch: the same steps, each one's tokens
        received from the first rank, which drew them."""
        num_rows = len(step.seq_lens)
        self._burst(step, lambda k, logits: self.tp.broadcast_from_first(
            torch.empty(num_rows, dtype=torch.int64, device=self.device)))

    def _burst(self, step: StepInput, draw) -> None:
        """The device loop of a multi-step launch, on every rank: ``step.num_steps`` forwards of the same rows, step
        k+1's tokens step k's draws (``draw(k, logits)`` gives them), its positions and context lengths one more,
        its KV slots from the same block tables (the scheduler allocated every kept draw's). A row past its kept
        draws (``step.burst_kept``: it reached max_tokens) writes no KV (slot -1) and reads token 0; its draws are
        dropped when applied."""
        steps, bs = step.num_steps, self.block_size
        self.num_steps += 1
        self.copy_blocks(step.block_copies)
        ids, pos, meta, _ = self._device_inputs(step, extra_tokens=steps - 1)
        seq_index = torch.arange(len(step.seq_lens), device=self.device)
        kept = self._upload(step.burst_kept) if step.burst_kept else None
        for k in range(steps):
            if k:
                pos = pos + 1
                slots = meta.block_tables[seq_index, pos // bs].long() * bs + pos % bs
                if kept is not None:  # rows past their last kept draw: no KV write, a harmless token
                    live = kept > k
                    slots, ids = torch.where(live, slots, -1), torch.where(live, ids, 0)
                meta = dataclasses.replace(meta, slot_mapping=slots, seq_lens=meta.seq_lens + 1,
                                           max_seq_len=meta.max_seq_len + 1,
                                           seq_lens_cpu=[n + 1 for n in meta.seq_lens_cpu])
            ids = draw(k, self.model.compute_logits(self._run_model(ids, pos, meta)))

    @torch.inference_mode()
    def collect(self, launched: LaunchedStep) -> StepResult:
        """A launched step's draws on the host: the step's one wait for the device."""
        if launched.draws is None:
            result = StepResult([], launched.first_row)
        else:
            if launched.copied is not None:
                launched.copied.synchronize()
            result = self._to_host(launched.draws)
            result.first_row, result.failed = launched.first_row, launched.failed
        if launched.scored is not None:  # computed before the sampling pass: copying it back waits for nothing more
            values, ids = launched.scored
            result.prompt_logprobs = prompt_logprobs.split(values.cpu(), ids.cpu(), launched.prompt_logprobs)
        return result

    def _keep_draws(self, sched: SchedulerOutput, launched: LaunchedStep) -> None:
        """Async scheduling: keep the drawn tokens on the device for the next step's inputs, and start copying the
        draws to pinned host memory, so that applying them waits for that copy, not for the next step."""
        draws = launched.draws
        self._draws = draws.token_ids[-len(launched.first_row):] if launched.num_steps > 1 else draws.token_ids
        self._draw_row = {item.seq.seq_id: row for item, row in zip(sched.scheduled, launched.first_row) if row >= 0}
        if self.device.type != "cuda":
            return

        def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)

        launched.draws = SamplerOutput(*(to_host(t) for t in (draws.token_ids, draws.logprobs, draws.top_ids,
                                                               draws.top_logprobs)))
        launched.copied = torch.cuda.Event()
        launched.copied.record(torch.cuda.current_stream(self.device))  # this device's, whatever the thread's is

    def build_step(self, items: list[ScheduledSeq], block_copies: list[tuple[int, int]]) -> StepInput:
        """The step as plain lists (decodes first), with the block-table rows' changes to push and, for a backend
        that reads a shared prefix once a group, the decode rows' groups."""
        step = StepInput(block_copies=block_copies)
        input_ids, positions, table_writes = step.input_ids, step.positions, step.table_writes
        num_tokens = 0
        for item in items:
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            if n == 1:
                if start < len(seq.token_ids):
                    input_ids.append(seq.token_ids[start])
                else:  # async scheduling: its token is the previous step's draw, still on the device
                    step.ahead_index.append(len(input_ids))
                    step.ahead_rows.append(self._draw_row[seq.seq_id])
                    input_ids.append(0)
                positions.append(start)
                step.num_decodes += 1
            else:
                input_ids += seq.token_ids[start:start + n]
                positions += range(start, start + n)
            num_tokens += n
            step.query_lens.append(n)
            step.seq_lens.append(start + n)
            step.rows.append(self._row(seq, table_writes))
            if item.samples:
                step.sample_rows.append(num_tokens - 1)
        if self.shared_prefix_min_batch and step.num_decodes >= self.shared_prefix_min_batch:
            decodes = items[:step.num_decodes]
            plan = plan_shared_prefixes([item.seq.block_table for item in decodes], step.seq_lens[:step.num_decodes],
                                        self.block_size, self.max_shared_prefix_members, self.shared_prefix_min_blocks)
            if plan is not None:
                step.shared_prefix_lens, step.shared_group_sizes = plan
        return step

    @torch.inference_mode()
    def forward(self, step: StepInput):
        """Run the model on a step. Returns the logits of the sampling rows (None when no row samples) and, when
        the step scores prompt positions, their (values, ids) from ``prompt_logprobs.score`` (else None)."""
        self.num_steps += 1
        self.copy_blocks(step.block_copies)
        input_ids, positions, meta, sample_rows = self._device_inputs(step)
        scoring = None
        if step.prompt_logprobs is not None:
            scoring = prompt_logprobs.to_device(step.prompt_logprobs, self.device)
        hidden = self._run_model(input_ids, positions, meta)
        scored = None if scoring is None else prompt_logprobs.score(self.model, hidden, scoring)
        if not step.sample_rows:  # e.g. only prefill chunks that end before their prompt does
            return None, scored
        if len(step.sample_rows) == hidden.shape[0]:  # every row samples (a decode batch): no gather
            return self.model.compute_logits(hidden), scored
        # A one-token chunk of a prompt (the token budget cut it) runs among the decodes but draws nothing.
        return self.model.compute_logits(hidden[sample_rows]), scored

    def _run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The hidden states of a step: a CUDA-graph replay for a decode batch that has a graph, else the model."""
        if self.graphs is not None and meta.num_prefills == 0 and meta.num_seqs <= self.graphs.max_batch:
            return self.graphs.run(input_ids, positions, meta)
        return self.model(input_ids, positions, meta)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Draw every sample row. A request forking into more samples than a step runs sequences is drawn
        in parts of ``max_num_seqs`` rows, so that the sampler's memory peak is the profiled one."""
        num_rows, limit = batch.logits_index.numel(), self.info.max_num_seqs
        if num_rows <= limit:
            return self._sample_rows(logits, batch)
        return concat_outputs([self._sample_rows(logits, slice_rows(batch, start, min(start + limit, num_rows)))
                               for start in range(0, num_rows, limit)])

    def _sample_rows(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if self.gumbel_sample is not None and is_simple(batch):  # the model's logits straight to the draw
            rows = logits.index_select(0, batch.logits_index) if batch.needs_gather else logits
            tokens, logprobs = self.gumbel_sample(rows, 1.0 / batch.temperature, batch.is_greedy, batch.seeds)
            return SamplerOutput(tokens, logprobs if batch.max_num_logprobs >= 0 else None, None, None)
        return sample(logits.float(), batch, self.gumbel_sample)

    def _device_inputs(self, step: StepInput, extra_tokens: int = 0):
        """The step's device tensors: token ids, positions, attention metadata, the sampling rows' token indices.
        ``extra_tokens``: the block tables' width also covers that many more tokens (a multi-step launch)."""
        dev, bs = self.device, self.block_size
        if step.table_writes:
            r, c, b = zip(*step.table_writes)
            self.block_tables[self._upload(r), self._upload(c)] = self._upload(b, torch.int32)
        t, s = len(step.input_ids), len(step.seq_lens)
        # One host-to-device copy for the per-token and per-sequence integers.
        packed = self._to_device(step.input_ids + step.positions + step.query_lens + step.seq_lens + step.rows
                                 + step.sample_rows + step.ahead_index + step.ahead_rows
                                 + step.shared_prefix_lens + step.shared_group_sizes)
        ids, pos = packed[:t], packed[t:2 * t]
        qlens, lens = packed[2 * t:2 * t + s], packed[2 * t + s:2 * t + 2 * s]
        end = 2 * t + 3 * s + len(step.sample_rows)
        row_idx, samples = packed[2 * t + 2 * s:2 * t + 3 * s], packed[2 * t + 3 * s:end]
        ahead_end = end + 2 * len(step.ahead_index)
        if step.ahead_index:
            self._feed_draws(ids, packed[end:ahead_end])
        shared = None
        if step.shared_prefix_lens:
            nd = step.num_decodes
            groups = packed[ahead_end:ahead_end + 2 * nd].to(torch.int32)
            shared = SharedPrefixes(groups[:nd], groups[nd:])
        max_blocks = -(-(max(step.seq_lens) + extra_tokens) // bs)
        tables = self.block_tables[row_idx, :max_blocks]  # [B, max_blocks]
        if step.num_decodes == s:
            token_seq = torch.arange(s, device=dev)
        else:
            token_seq = torch.repeat_interleave(torch.arange(s, device=dev), qlens, output_size=t)
        slots = tables[token_seq, pos // bs].long() * bs + pos % bs
        starts = torch.zeros(s + 1, dtype=torch.int32, device=dev)
        starts[1:] = torch.cumsum(qlens, 0)
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=starts, seq_lens=lens.to(torch.int32), block_tables=tables,
            num_decodes=step.num_decodes, max_query_len=max(step.query_lens), max_seq_len=max(step.seq_lens),
            query_lens_cpu=step.query_lens, seq_lens_cpu=step.seq_lens, shared_prefixes=shared)
        return ids, pos, meta, samples

    def _feed_draws(self, ids: torch.Tensor, ahead: torch.Tensor) -> None:
        """Write the previous step's draws into this step's token ids, on the device (async scheduling). ``ahead``:
        [2A] the token indices, then the draws' rows; rank 0 alone holds the draws and sends them to the others."""
        index, rows = ahead.chunk(2)
        if self.tp.rank == 0:
            draws = self._draws[rows].long()
        else:
            draws = torch.empty(index.numel(), dtype=torch.int64, device=self.device)
        ids[index] = self.tp.broadcast_from_first(draws)

    def _pending_draws(self, seqs: list[Sequence]) -> torch.Tensor:
        """Async scheduling: the draws of the step in flight for ``seqs``, [len(seqs)] on the device."""
        return self._draws[self._upload([self._draw_row[seq.seq_id] for seq in seqs])].long()

    def _upload(self, values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """``values`` on the device. Async scheduling on CUDA: through pinned memory, without waiting -- a copy from
        pageable memory synchronizes the stream, so building a step would wait for the one in flight."""
        if self._uploads_ahead:
            return torch.tensor(values, dtype=dtype).pin_memory().to(self.device, non_blocking=True)
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _to_device(self, values: list[int]) -> torch.Tensor:
        """int64 tensor of ``values`` on the device, through a reused pinned buffer on CUDA."""
        host = torch.tensor(values, dtype=torch.int64)
        if self.device.type != "cuda":
            return host
        if self._staging is None or self._staging.numel() < len(values):
            self._staging = torch.empty(max(len(values), 2 * (0 if self._staging is None else
                                                                self._staging.numel())),
                                        dtype=torch.int64).pin_memory()
        elif self._staging_event is not None:
            self._staging_event.synchronize()  # the previous step's copy out of the buffer has finished
        staging = self._staging[:len(values)]
        staging.copy_(host)
        on_device = staging.to(self.device, non_blocking=True)
        self._staging_event = torch.cuda.Event()
        self._staging_event.record(torch.cuda.current_stream(self.device))
        return on_device

    @staticmethod
    def _to_host(out: SamplerOutput) -> StepResult:
        """The step's one host sync: the drawn tokens (and the logprobs some request asked for)."""
        if out.logprobs is None:
            return StepResult(out.token_ids.tolist(), [])
        if out.top_ids is None:
            host = torch.stack([out.token_ids.double(), out.logprobs.double()]).cpu()
            return StepResult(host[0].long().tolist(), [], host[1].tolist())
        # The top N stay arrays ([S, N], one conversion per step): each sample copies its row (TopLogprobRows).
        return StepResult(out.token_ids.tolist(), [], out.logprobs.tolist(),
                          out.top_ids.to(torch.int32).cpu().numpy(), out.top_logprobs.float().cpu().numpy())


def _gumbel_sampler(device: torch.device):
    """The Triton Gumbel-max draw on CUDA (when Triton is there), else None: the inverse-CDF draw."""
    if device.type != "cuda":
        return None
    try:
        from rlserve.engine.sampler_triton import gumbel_sample
    except ImportError:  # pragma: no cover - CUDA without Triton
        logger.warning("Triton is not installed: sampling on CUDA draws by inverse CDF")
        return None
    return gumbel_sample
