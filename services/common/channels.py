"""Client channels to other services: message limits, keepalive, round-robin over all resolved addresses."""

from __future__ import annotations

import json

import grpc

_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def open_channel(target: str, *, max_message_bytes: int = 4 * 1024 * 1024) -> grpc.aio.Channel:
    """An insecure channel to `target` (host:port, or dns:///name:port for every replica)."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Retries are decided by the caller (before the first token only), not by the channel.
        ("grpc.enable_retries", 0),
    ]
    return grpc.aio.insecure_channel(target, options=options)
