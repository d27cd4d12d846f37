"""How the gateway opens gRPC channels."""

from __future__ import annotations

import grpc

from lorafleet_common.grpc_tls import GrpcTls, open_aio_channel

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def open_channel(target: str, *, connect_timeout_s: float, tls: GrpcTls | None = None) -> grpc.aio.Channel:
    """A channel whose connection attempts are bounded and whose reconnects stay quick; mTLS when ``tls`` is given.

    gRPC's default reconnect backoff grows to 120 s, which would keep a
    recovered replica out of rotation for minutes; cap it at 5 s. The
    ``min_reconnect_backoff`` is gRPC's minimum connect deadline, i.e. the
    connect timeout. The pool retries explicitly, so channel retries are off.
    """
    options = [
        ("grpc.min_reconnect_backoff_ms", int(connect_timeout_s * 1000)),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 5000),
        ("grpc.enable_retries", 0),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ]
    return open_aio_channel(target, tls, options)
