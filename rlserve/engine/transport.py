"""Who may speak on the API server's replica sockets when they are reachable over the network.

Messages between the API server and its replicas are pickled (engine/messages.py), so whoever can put a frame on
those sockets runs code in the receiving process, and whoever can connect to a PUSH socket takes its share of the
requests. Local replicas talk over ipc:// in a directory only this user can enter. Ray replicas talk over tcp://
on an address every node of the cluster reaches, so there the sockets use ZMQ's CURVE: the API server's
sockets are CURVE servers that admit exactly one client key (checked by ZAP before any frame is delivered), and
the replicas connect with that client key pair. Both key pairs are made fresh per server start and reach the
replicas through Ray (the actor's arguments), never over the sockets they protect. CURVE also encrypts the
prompts and completions on the wire.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, replace

import zmq

ZAP_DOMAIN = b"rlserve"


@dataclass(frozen=True)
class CurveKeys:
    """Z85-encoded key pairs: the API server's (``server_*``) and the one every replica uses (``client_*``)."""
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def generate(cls) -> "CurveKeys":
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq has no CURVE support: replicas on other nodes cannot be secured")
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret)

    def for_replica(self) -> "CurveKeys":
        """What a replica gets: the server's secret stays in the API server."""
        return replace(self, server_secret=b"")

    def __repr__(self) -> str:  # never in a log line
        return "CurveKeys(<redacted>)"


def secure_bound_socket(sock: zmq.Socket, keys: CurveKeys | None) -> None:
    """Before ``bind``: make ``sock`` a CURVE server whose peers ZAP checks (see ``ClientKeyAuthenticator``)."""
    if keys is None:
        return
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN


def secure_connecting_socket(sock: zmq.Socket, keys: CurveKeys | None) -> None:
    """Before ``connect``: a CURVE client with the replicas' key pair, that accepts only the API server's key."""
    if keys is None:
        return
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret


class ClientKeyAuthenticator:
    """ZAP for one context: a CURVE peer is admitted only with the replicas' client key; anything else (no CURVE,
    another key) is refused during the handshake, before a frame reaches the application. Runs in pyzmq's
    authenticator thread, on a sync shadow of ``context`` (ZAP is per libzmq context)."""

    def __init__(self, context: zmq.Context, keys: CurveKeys):
        from zmq.auth.thread import ThreadAuthenticator
        self._shadow = zmq.Context.shadow(context.underlying)
        self._auth = ThreadAuthenticator(self._shadow)
        self._client_public = keys.client_public
        self._auth.start()
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN.decode(), credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: ``key`` is the peer's Z85 public key."""
        return hmac.compare_digest(key, self._client_public)

    def stop(self) -> None:
        self._auth.stop()
