"""Client channels to other services: message limits, keepalive, round-robin over all resolved addresses."""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc

_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


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
    target: str, *, max_message_bytes: int = 4 * 1024 * 1024, tls: ClientTls | None = None
) -> grpc.aio.Channel:
    """A channel to `target` (host:port, or dns:///name:port for every replica), TLS when `tls` is given."""
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
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(target, tls.credentials(), options=options)
