"""The API server's engine client against what a replica on another node can send it: a frame that does not
unpickle, a replica running another rlserve, and its own background tasks ending. None of it may leave a request
waiting for good; the replicas' next messages must still get through. No replica processes: the messages are
sent on the client's own output socket."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import time
import types

import pytest
import zmq
import zmq.asyncio

from rlserve.engine import messages as msg
from rlserve.server.errors import EngineUnavailable
from rlserve.server.replicas import EngineClient, Replica


@contextlib.asynccontextmanager
async def _client():
    """An EngineClient with its output socket bound and its reader and watcher running, one fake replica that
    stays alive, and a PUSH socket that speaks for it; all torn down after."""
    client = EngineClient(types.SimpleNamespace(), 1, tokenizer=None)
    client.output = client.ctx.socket(zmq.PULL)
    addr = client._bind(client.output, "out")
    handle = types.SimpleNamespace(is_alive=lambda: True, remote=False, killed=[])
    handle.kill = lambda: handle.killed.append(True)
    client.replicas = [Replica(0, handle, socket=None)]
    peers = zmq.Context()
    replica = peers.socket(zmq.PUSH)
    replica.setsockopt(zmq.LINGER, 0)
    replica.connect(addr)
    client._start_background_tasks()
    try:
        yield client, replica
    finally:
        for task in client._tasks:
            task.cancel()
        await asyncio.gather(*client._tasks, return_exceptions=True)
        peers.destroy(linger=0)
        client.ctx.destroy(linger=0)


async def _call(client: EngineClient, call_id: int) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    client.calls[call_id] = future
    return future


def test_a_frame_that_does_not_unpickle_is_dropped_and_the_next_message_arrives(caplog):
    async def run():
        async with _client() as (client, replica):
            answer = await _call(client, 7)
            replica.send(b"\x80\x05not a pickle")
            replica.send(pickle.dumps(msg.UtilityResult(7, {"ok": True})))
            assert await asyncio.wait_for(answer, 10) == {"ok": True}
            assert all(not t.done() for t in client._tasks)  # the reader goes on
            assert client.dead is None

    asyncio.run(run())
    assert "does not unpickle" in caplog.text and "same rlserve" in caplog.text


def test_a_replica_running_another_rlserve_is_refused_and_named():
    async def run():
        async with _client() as (client, replica):
            info = {"protocol": "0123456789abcdef"}
            replica.send(pickle.dumps(msg.EngineReady(0, info, pid=1)))
            await asyncio.wait_for(client.ready.wait(), 10)  # startup ends, with the reason
            assert client.startup_error is not None
            assert "replica 0 runs another rlserve" in client.startup_error
            assert "install the same rlserve on every node" in client.startup_error
            assert client.replicas[0].info is None and client.replicas[0].handle.killed  # its GPUs are freed
        async with _client() as (client, replica):  # the same message with this rlserve's protocol is welcome
            info = {"protocol": msg.PROTOCOL}
            replica.send(pickle.dumps(msg.EngineReady(0, info, pid=1)))
            await asyncio.wait_for(client.replicas[0].started.wait(), 10)
            assert client.replicas[0].info == info
            assert client.startup_error is None and client.replicas[0].dead is None

    asyncio.run(run())


def test_the_output_reader_ending_fails_every_waiter_instead_of_leaving_it_hanging():
    async def run():
        async with _client() as (client, replica):
            client.ready.set()
            answer = await _call(client, 3)
            pending = asyncio.get_running_loop().create_future()
            client.pending["req-0"] = pending
            await asyncio.sleep(0.2)  # the reader waits in recv: closing the socket cancels that wait
            client.output.close(linger=0)  # not a shutdown (the context is open): a failure
            with pytest.raises(EngineUnavailable, match="output reader task stopped"):
                await asyncio.wait_for(pending, 10)
            with pytest.raises(EngineUnavailable, match="output reader task stopped"):
                await asyncio.wait_for(answer, 10)
            assert client.dead is not None and not client.is_alive
            with pytest.raises(EngineUnavailable, match="engine is dead"):
                client.check_alive()  # new requests hear it at once

    asyncio.run(run())


def test_a_silent_replica_is_hung_unless_a_weight_sync_call_holds_it():
    """The watchdog: silence past --replica_timeout is a hang; a health probe's Ping waiting on the replica does not
    excuse it (it does not hold the loop), a weight update waiting on the trainer does (its own timeout)."""
    async def run():
        async with _client() as (client, replica):
            client.replica_timeout_s = 0.5
            r = client.replicas[0]
            r.started.set()
            r.last_heard = time.monotonic()
            assert not client._is_hung(r)
            client.call_replica[1] = 0  # a Ping in flight
            r.last_heard = time.monotonic() - 1
            assert client._is_hung(r)
            client.call_replica[2] = 0  # an UpdateWeights in flight
            client.weight_calls.add(2)
            assert not client._is_hung(r)
            client.weight_calls.discard(2)
            client.ready.set()
            waiter = asyncio.get_running_loop().create_future()
            client.pending["req-0"] = waiter
            r.request_ids.add("req-0")
            client.request_replica["req-0"] = 0
            with pytest.raises(EngineUnavailable, match=r"replica 0 sent nothing for 0.5s \(--replica_timeout\): hung"):
                await asyncio.wait_for(waiter, 10)  # the watcher (every 0.5 s) declares it
            assert r.dead is not None and r.handle.killed

    asyncio.run(run())
