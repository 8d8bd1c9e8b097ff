"""Token-by-token server-sent event streams of /v1/completions and /v1/chat/completions, in vLLM's layout.

The replicas send each streamed sample's new tokens after every step (``AddRequest(stream=True)``); this module
turns them into chunks: ``text_completion`` chunks with a ``text`` delta, or ``chat.completion.chunk``s with a
``delta`` (the first of each choice carries only ``role``), the finish reason on each choice's last chunk, an
optional usage chunk with no choices (``stream_options.include_usage``), then ``data: [DONE]``. A request that
fails mid-stream ends with an ``error`` event (the status line went out with the first chunk).

It knows nothing about routing or validation: the route submits the request (400s come before any event) and
awaits ``start``, the group's first updates (at most ``START_WAIT_S``), so that what only a replica can refuse (a
grammar it cannot compile, a prompt its KV cache cannot hold: a replica refuses at admission, before any step) is
an HTTP error too. The stream then only reads the group's updates and, however it ends -- finished, failed, the
client gone (the response is cancelled or closed, or never started: ``EventStreamResponse``) -- lets the group go
and aborts what still runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi.responses import StreamingResponse

from rlserve.outputs import CompletionOutput
from rlserve.sampling import SamplingParams
from rlserve.server.errors import ServerError
from rlserve.server.replicas import ClientDisconnected, EngineClient, RequestGroup, StreamedUpdate
from rlserve.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

# How long a streamed response waits for its requests' first updates before it sends its headers: long enough for a
# replica's refusal at admission (within one engine step), short enough that a queued request's client and any proxy
# between get their 200 without waiting for the queue and the prefill.
START_WAIT_S = 1.0


class SampleText:
    """One streamed sample's text, handed out as it grows: only what is new, never a trailing incomplete
    character (the detokenizer holds it back), and with stop strings never the last (longest stop - 1)
    characters before the sample ends -- they may begin a stop string that the engine will cut. At the end it
    hands out what remains of the sample's final text, the non-streamed one.

    Invariant: what was handed out is a prefix of the final text. It decodes as the final text was made: with
    stop strings the engine sends the text of its ``IncrementalDetokenizer`` with prompt context (cut or not:
    ``StopState.final_text``), the same as this one; without, the final text is a plain decode of the tokens, which
    one without context follows. A stop string ends in the step that completes it, so it starts within the
    held-back tail."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        context = prompt_token_ids if params.stop else []
        self.detokenizer = IncrementalDetokenizer(tokenizer, context, params.skip_special_tokens)
        self.num_held = max((len(stop) for stop in params.stop), default=1) - 1
        self.num_sent = 0  # characters handed out

    def add(self, token_ids: list[int], final_text: str | None = None) -> str:
        """The new text after these tokens; ``final_text``: the sample ended, with this text."""
        if final_text is not None:
            delta, self.num_sent = final_text[self.num_sent:], len(final_text)
            return delta
        for token_id in token_ids:
            self.detokenizer.add(token_id)
        num_chars = self.detokenizer.num_chars
        ready = num_chars - self.num_held
        if ready <= self.num_sent:
            return ""
        delta = self.detokenizer.tail(num_chars - self.num_sent)[:ready - self.num_sent]
        self.num_sent = ready
        return delta


@dataclass
class Choice:
    index: int  # the choice's index in the response
    text: SampleText
    num_token_chars: int = 0  # completions' logprobs: the text_offset of the next token
    finished: bool = False
    sent_prompt_logprobs: bool = False
    sent_prompt_ids: bool = False  # return_token_ids: the prompt's ids go with the choice's first chunk


class ResponseStream:
    """The events of one streamed response. ``format_logprobs(delta output, text offset)``: a chunk's logprobs
    for the delta's tokens (the routes' non-streamed layout); ``format_prompt_logprobs(prompt logprobs)``: a
    prompt's, sent with the first chunk of each of its choices that comes once they are known (in the choice,
    or at the chunk's top level for chat, as the non-streamed responses place them)."""

    def __init__(self, engine: EngineClient, group: RequestGroup, prompts: list[tuple[str | None, list[int]]],
                 params: SamplingParams, *, chat: bool, model: str, include_usage: bool, return_token_ids: bool,
                 format_logprobs: Callable[[CompletionOutput, int], dict | None],
                 format_prompt_logprobs: Callable | None = None):
        self.engine, self.group, self.prompts, self.params = engine, group, prompts, params
        self.chat, self.include_usage, self.return_token_ids = chat, include_usage, return_token_ids
        self.format_logprobs, self.format_prompt_logprobs = format_logprobs, format_prompt_logprobs
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                     "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model}
        # (prompt index, sample index) -> its choice, numbered as the non-streamed response numbers them
        self.choices = {(p, s): Choice(p * params.n + s, SampleText(engine.tokenizer, ids, params))
                        for p, (_, ids) in enumerate(prompts) for s in range(params.n)}
        self.prompt_logprobs: dict[int, list | None] = {}  # prompt index -> its formatted prompt logprobs
        self.num_completion_tokens = 0
        self.first: list[StreamedUpdate] | None = None  # the group's first updates (``start``)
        self.started = False
        self.closed = False

    async def start(self, is_disconnected=None) -> None:
        """Wait for the group's first updates (at most ``START_WAIT_S``), before any byte of the response is sent:
        a request that its replica refuses fails here, as an HTTP error. Whatever this raises, the group is let go
        and what runs is aborted."""
        try:
            self.first = await asyncio.wait_for(self.engine.next_updates(self.group, is_disconnected), START_WAIT_S)
        except asyncio.TimeoutError:  # nothing yet (a queue, a long prefill): the stream starts, errors are events
            self.first = []
        except BaseException:
            self.close()
            raise
        self.started = True

    def close(self) -> None:
        """Let the group go and abort what still runs; once, however the response ended (``EventStreamResponse``
        calls it even when the body was never iterated: a client gone before the first byte)."""
        if not self.closed:
            self.closed = True
            self.engine.abort_soon(self.engine.release(self.group))

    def _event(self, choices: list[dict], **extra) -> str:
        chunk = dict(self.head, choices=choices, **extra)
        if self.include_usage:
            chunk.setdefault("usage", None)
        return f"data: {json.dumps(chunk)}\n\n"

    def opening(self) -> list[str]:
        """Chat's first chunk of each choice, before any token: the role; with return_token_ids the first one
        carries the prompt's ids at its top level (as the non-streamed chat response places them)."""
        if not self.chat:
            return []
        events = []
        for c in self.choices.values():
            extra = {}
            if self.return_token_ids and not events:
                extra["prompt_token_ids"] = self.prompts[0][1]
            events.append(self._event([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], **extra))
        return events

    def events_of(self, updates: list[StreamedUpdate]) -> str:
        """The chunks of one batch of updates: one per choice that has something new, in their order."""
        events = []
        for u in updates:
            chunk = self._choice_chunk(u)
            if chunk is None:
                continue
            if self.chat and "prompt_logprobs" in chunk:  # a chat completion has them at the top level
                events.append(self._event([chunk], prompt_logprobs=chunk.pop("prompt_logprobs")))
            else:
                events.append(self._event([chunk]))
        return "".join(events)

    def _choice_chunk(self, u: StreamedUpdate) -> dict | None:
        update, choice = u.update, self.choices[(u.prompt_index, u.update.index)]
        if choice.finished:
            return None
        finish_reason = update.finish_reason
        choice.finished = finish_reason is not None
        self.num_completion_tokens += len(update.token_ids)
        if update.prompt_logprobs is not None and self.format_prompt_logprobs is not None:
            self.prompt_logprobs[u.prompt_index] = self.format_prompt_logprobs(update.prompt_logprobs)
        text = choice.text.add(update.token_ids, u.output.text if choice.finished else None)
        logprobs = None
        if update.sampled_logprobs is not None:
            delta = CompletionOutput(update.index, token_ids=update.token_ids,
                                     sampled_logprobs=update.sampled_logprobs, top_n=update.top_logprobs)
            logprobs = self.format_logprobs(delta, choice.num_token_chars)
            if logprobs is not None and logprobs.get("tokens"):
                choice.num_token_chars = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        carries_tokens = bool(update.token_ids) and (logprobs is not None or self.return_token_ids)
        if not (text or choice.finished or carries_tokens):
            return None
        if self.chat:
            chunk = {"index": choice.index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                     "finish_reason": finish_reason, "stop_reason": update.stop_reason if finish_reason else None}
        else:
            chunk = {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                     "stop_reason": update.stop_reason if finish_reason else None}
        if self.return_token_ids:
            chunk["token_ids"] = update.token_ids
            if not self.chat and not choice.sent_prompt_ids:  # a completion choice's first chunk, as vLLM sends it
                choice.sent_prompt_ids = True
                chunk["prompt_token_ids"] = self.prompts[u.prompt_index][1]
        if not choice.sent_prompt_logprobs and u.prompt_index in self.prompt_logprobs:
            choice.sent_prompt_logprobs = True
            chunk["prompt_logprobs"] = self.prompt_logprobs[u.prompt_index]
        if choice.finished:
            chunk["weight_versions"] = u.output.weight_versions
        return chunk

    def usage_event(self) -> str:
        prompt = sum(len(ids) for _, ids in self.prompts)
        usage = {"prompt_tokens": prompt, "completion_tokens": self.num_completion_tokens,
                 "total_tokens": prompt + self.num_completion_tokens}
        return self._event([], usage=usage)

    async def events(self, is_disconnected=None) -> AsyncIterator[str]:
        """The response body. Closed or cancelled (the client went away), or ended any way, it lets the group go
        and aborts its running requests; the cleanup does not await, since a cancelled task cannot."""
        try:
            if not self.started:  # (the route awaits start first; errors then are events, not statuses)
                await self.start(is_disconnected)
            for event in self.opening():
                yield event
            updates = self.first
            while updates is not None:
                if any(u.update.prompt_logprobs is not None for u in updates):  # large: formatted off the loop
                    events = await asyncio.to_thread(self.events_of, updates)
                else:
                    events = self.events_of(updates)
                if events:
                    yield events
                updates = await self.engine.next_updates(self.group, is_disconnected)
            if self.include_usage:
                yield self.usage_event()
        except ClientDisconnected:
            return
        except ServerError as e:  # the status line is sent: the failure goes in the stream, as vLLM does
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'code': e.status}})}\n\n"
        except Exception as e:  # a bug of this server's: still an error event, and the stream ends properly
            logger.exception("streamed response failed")
            error = {"message": f"{type(e).__name__}: {e}", "type": "internal_error", "code": 500}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:
            self.close()
        yield "data: [DONE]\n\n"


class EventStreamResponse(StreamingResponse):
    """The ``text/event-stream`` response of a ``ResponseStream``, which it closes however the response ends: the
    body's own cleanup runs only once the body has started, and a client that leaves before the first byte (the
    response cancelled, or the headers' send failing) would otherwise leave its requests running."""

    def __init__(self, stream: ResponseStream, is_disconnected=None):
        super().__init__(stream.events(is_disconnected), media_type="text/event-stream")
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close()
