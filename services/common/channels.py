"""Client channels to other services: message limits, keepalive, round-robin over all resolved addresses."""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc

_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

# Keepalive, one rule on both ends: a client pings every KEEPALIVE_TIME_MS (also with no call open, so a
# dead peer is found before a call needs it), and a server accepts pings that often. A server that
# thought the pings too frequent would answer GOAWAY "too_many_pings" and cut every stream on the
# connection, so the server's minimum interval stays below the client's ping time.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
KEEPALIVE_MIN_INTERVAL_MS = 10_000
KEEPALIVE_SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MIN_INTERVAL_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 0),  # never GOAWAY a client for its pings
]
KEEPALIVE_CLIENT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # long streams with sparse tokens keep pinging
]


@dataclass(frozen=True)
class ClientTls:
    """PEM files for TLS to a peer: the CA that signed its certificate, and our own pair for mutual TLS."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


def open_channel(
    target: str,
    *,
    max_message_bytes: int = 4 * 1024 * 1024,
    tls: ClientTls | None = None,
    own_connection: bool = False,
) -> grpc.aio.Channel:
    """A channel to `target` (host:port, or dns:///name:port for every replica), TLS when `tls` is given.

    Nothing on the client's side ends a running call: no idle timeout applies while a call is open,
    keepalive follows the servers' rule (above), and a server's GOAWAY at its connection age lets the
    calls on the old connection finish (within the server's grace) while new calls open a new one.
    `own_connection`: a connection of its own even beside another channel to the same target.
    """
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.service_config", _SERVICE_CONFIG),
        *KEEPALIVE_CLIENT_OPTIONS,
        # Retries are decided by the caller (before the first token only), not by the channel.
        ("grpc.enable_retries", 0),
    ]
    if own_connection:
        # Not shared with other channels to the same target (gRPC's global subchannel pool would).
        options.append(("grpc.use_local_subchannel_pool", 1))
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(target, tls.credentials(), options=options)
