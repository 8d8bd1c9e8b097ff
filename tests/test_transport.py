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
def _api_side(zap: bool = True):
    """The API server's side as a Ray server builds it (placement set: tcp:// sockets, CURVE keys), and a context
    for the peers that dial it; both torn down after. ``zap=False`` leaves out the key check (ZAP), keeping the
    CURVE handshake: what the tests must catch."""
    from rlserve.engine.transport import ClientKeyAuthenticator
    from rlserve.server.replicas import EngineClient
    client = EngineClient(types.SimpleNamespace(), 1, tokenizer=None, placement=types.SimpleNamespace(),
                          advertise_host="127.0.0.1")
    client.authenticator = ClientKeyAuthenticator(client.ctx, client.curve) if zap else None
    peers = zmq.Context()
    try:
        yield client, peers
    finally:
        peers.destroy(linger=0)
        if client.authenticator is not None:
            client.authenticator.stop()
        client.ctx.destroy(linger=0)


def _peer(ctx: zmq.Context, kind: int, addr: str, keys: CurveKeys | None, admitted: bool = False) -> zmq.Socket:
    """A socket that dials ``addr``; ``admitted``: returns once its CURVE handshake has succeeded (10 s at most),
    so that a test's messages cannot go out before the peer is there to be dealt some."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    secure_connecting_socket(sock, keys)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED) if admitted else None
    sock.connect(addr)
    if monitor is not None:
        try:
            assert monitor.poll(10_000), "the CURVE handshake did not succeed within 10 s"
            monitor.recv_multipart()
        finally:
            sock.disable_monitor()
            monitor.close(0)
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
                rogue.sndtimeo = 1000  # once its handshake is refused a rogue has no pipe, and a send would block
                with contextlib.suppress(zmq.Again):
                    rogue.send(pickle.dumps(Payload()))
            assert await output.poll(1000) == 0
            replica = _peer(peers, zmq.PUSH, addr, client.curve.for_replica())
            replica.send_pyobj("ready")
            assert await asyncio.wait_for(output.recv_pyobj(), 10) == "ready"
            assert await output.poll(200) == 0  # the rogues' frames never arrive, not even late
            assert not Payload.unpickled

    asyncio.run(run())


def _deal_to_a_replica_and_strangers(zap: bool, num_messages: int = 8) -> tuple[list, dict[str, int]]:
    """Bind a replica's input (PUSH) socket, connect the replica and two strangers to it, send
    ``num_messages``; returns what the replica got and how many each stranger got."""
    async def run():
        with _api_side(zap) as (client, peers):
            inbox = client.ctx.socket(zmq.PUSH)
            addr = client._bind(inbox, "in0-0")
            other = CurveKeys.generate()
            strangers = {
                "no CURVE": _peer(peers, zmq.PULL, addr, None),  # refused by the mechanism mismatch alone
                # a CURVE client that knows the server's public key, with a key pair the server does not admit
                "another key": _peer(peers, zmq.PULL, addr, CurveKeys(client.curve.server_public, b"",
                                                                      other.client_public, other.client_secret),
                                     admitted=not zap),
            }
            replica = _peer(peers, zmq.PULL, addr, client.curve.for_replica(), admitted=True)
            await asyncio.sleep(0.5)  # the refused strangers' attempts made too
            for i in range(num_messages):
                await inbox.send_pyobj(i)
            got = []
            while replica.poll(1000 if zap else 300):  # with strangers admitted, fewer than all reach it
                got.append(replica.recv_pyobj())
            taken = {}
            for name, sock in strangers.items():
                taken[name] = 0
                while sock.poll(200):
                    sock.recv()
                    taken[name] += 1
            return got, taken

    return asyncio.run(run())


def test_a_stranger_connecting_to_a_replicas_input_gets_none_of_its_requests():
    """A PUSH socket deals its messages round-robin over its peers: a stranger admitted as one would take a
    share of the requests (and see their prompts)."""
    got, taken = _deal_to_a_replica_and_strangers(zap=True)
    assert got == list(range(8)) and taken == {"no CURVE": 0, "another key": 0}, (got, taken)


def test_without_the_key_check_the_keyed_stranger_takes_requests():
    """The test above can fail: without ZAP (CURVE alone admits any client key) the stranger with a key of its
    own is dealt its share, and the replica misses those."""
    got, taken = _deal_to_a_replica_and_strangers(zap=False)
    assert taken["another key"] > 0 and taken["no CURVE"] == 0 and len(got) < 8, (got, taken)


def test_a_replica_gets_no_server_secret_and_keys_never_print():
    keys = CurveKeys.generate()
    replica = keys.for_replica()
    assert replica.server_secret == b"" and replica.client_secret == keys.client_secret
    assert keys.server_secret.decode() not in repr(keys) and keys.client_secret.decode() not in repr(replica)
