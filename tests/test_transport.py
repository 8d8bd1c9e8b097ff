"""The replica sockets of a Ray server are reachable over the network and carry pickles: only the replicas'
CURVE key may speak on them (rlserve/engine/transport.py). A peer without it must never get a frame through, in
either direction, and the replicas' own traffic must flow right after."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import types

import pytest
import zmq
import zmq.asyncio

from rlserve.engine.transport import CurveKeys, secure_connecting_socket

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


class Payload:
    """A frame whose unpickling would run code in the receiver: it must never be unpickled."""
    unpickled = False

    def __reduce__(self):
        return (_mark_unpickled, ())


def _mark_unpickled():
    Payload.unpickled = True
    return "pwned"


@contextlib.contextmanager
def _api_side():
    """The API server's side as a Ray server builds it (placement set: tcp:// sockets, CURVE keys), and a context
    for the peers that dial it; both torn down after."""
    from rlserve.engine.transport import ClientKeyAuthenticator
    from rlserve.server.replicas import EngineClient
    client = EngineClient(types.SimpleNamespace(), 1, tokenizer=None, placement=types.SimpleNamespace(),
                          advertise_host="127.0.0.1")
    client.authenticator = ClientKeyAuthenticator(client.ctx, client.curve)
    peers = zmq.Context()
    try:
        yield client, peers
    finally:
        peers.destroy(linger=0)
        client.authenticator.stop()
        client.ctx.destroy(linger=0)


def _peer(ctx: zmq.Context, kind: int, addr: str, keys: CurveKeys | None) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    secure_connecting_socket(sock, keys)
    sock.connect(addr)
    return sock


def test_only_the_replicas_key_can_send_to_the_api_server():
    async def run():
        with _api_side() as (client, peers):
            output = client.ctx.socket(zmq.PULL)
            addr = client._bind(output, "out")
            assert addr.startswith("tcp://127.0.0.1:")
            stranger = CurveKeys.generate()
            rogues = [_peer(peers, zmq.PUSH, addr, None),  # no CURVE at all
                      # knows the server's public key, but not the replicas' key pair
                      _peer(peers, zmq.PUSH, addr, CurveKeys(client.curve.server_public, b"",
                                                             stranger.client_public, stranger.client_secret))]
            for rogue in rogues:
                rogue.send(pickle.dumps(Payload()))
            assert await output.poll(1000) == 0
            replica = _peer(peers, zmq.PUSH, addr, client.curve.for_replica())
            replica.send_pyobj("ready")
            assert await asyncio.wait_for(output.recv_pyobj(), 10) == "ready"
            assert await output.poll(200) == 0  # the rogues' frames never arrive, not even late
            assert not Payload.unpickled

    asyncio.run(run())


def test_a_stranger_connecting_to_a_replicas_input_gets_none_of_its_requests():
    """A PUSH socket deals its messages round-robin over its peers: a stranger admitted as one would take a
    share of the requests (and see their prompts)."""
    async def run():
        with _api_side() as (client, peers):
            inbox = client.ctx.socket(zmq.PUSH)
            addr = client._bind(inbox, "in0-0")
            stranger = _peer(peers, zmq.PULL, addr, None)
            replica = _peer(peers, zmq.PULL, addr, client.curve.for_replica())
            await asyncio.sleep(0.3)  # both connections attempted before anything is sent
            for i in range(8):
                await inbox.send_pyobj(i)
            got = []
            for _ in range(8):
                assert replica.poll(5000), got
                got.append(replica.recv_pyobj())
            assert got == list(range(8))
            assert stranger.poll(200) == 0

    asyncio.run(run())


def test_a_replica_gets_no_server_secret_and_keys_never_print():
    keys = CurveKeys.generate()
    replica = keys.for_replica()
    assert replica.server_secret == b"" and replica.client_secret == keys.client_secret
    assert keys.server_secret.decode() not in repr(keys) and keys.client_secret.decode() not in repr(replica)
