"""Edge settings, read from EDGE_* environment variables."""

from __future__ import annotations

import ipaddress
import zoneinfo

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings


def channel_target(addr: str) -> str:
    """A gRPC target for a peer address: `host:port`, `dns:///name:port`, or a comma list of IP:port.

    A comma list becomes one `ipv4:`/`ipv6:` target, so the channel's round robin spreads calls over it.
    """
    addr = addr.strip()
    if not addr:
        raise ValueError("address is empty")
    if "," not in addr:
        return addr
    hosts: list[str] = []
    families: set[int] = set()
    for part in (p.strip() for p in addr.split(",")):
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"{part!r} in a comma list must be IP:port")
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ValueError(
                f"{part!r}: a comma list takes IP addresses only; use dns:///name:port for a host name"
            ) from None
        families.add(ip.version)
        hosts.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    if len(families) > 1:
        raise ValueError("a comma list must not mix IPv4 and IPv6 addresses")
    return f"ipv{families.pop()}:{','.join(hosts)}"


class EdgeSettings(ServerSettings):
    """The public entry point and how it reaches the generator, retriever and cacher."""

    model_config = SettingsConfigDict(env_prefix="EDGE_", extra="ignore", frozen=True)

    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9091, ge=0, le=65535)

    generator_addr: str = Field(
        "127.0.0.1:50052",
        description="host:port, dns:///name:port (all replicas), or a comma list of IP:port.",
    )
    retriever_addr: str = Field("127.0.0.1:50053")
    cacher_addr: str = Field("127.0.0.1:50054")

    timezone: str = Field("Asia/Seoul", description="Time zone of 'today', the default TIL date.")

    max_diff_bytes: int = Field(256 * 1024, ge=1, description="Largest diff accepted, in UTF-8 bytes.")
    max_commit_messages: int = Field(50, ge=0)
    max_commit_message_chars: int = Field(2000, ge=1)
    default_max_tokens: int = Field(1024, ge=1, description="Output tokens when a request sets none.")
    max_tokens_limit: int = Field(4096, ge=1, description="Most output tokens a request may ask for.")
    prompt_chars_per_token: float = Field(
        3.0, gt=0, description="Estimate used to trim a diff that cannot fit the model's context."
    )

    cache_ttl_s: int = Field(7 * 24 * 3600, ge=0, description="Time to live of cached results; 0 keeps them.")
    cache_timeout_s: float = Field(0.2, gt=0, description="Deadline of one cache call.")
    retrieval_timeout_s: float = Field(0.5, gt=0, description="Deadline of one retriever search.")
    write_timeout_s: float = Field(
        5.0, gt=0, description="Deadline of one background write (cache store or index upsert)."
    )
    til_fetch_timeout_s: float = Field(2.0, gt=0, description="Deadline of loading a stored TIL by id.")
    question_history_k: int = Field(
        10, ge=0, description="Earlier questions the model is told not to repeat; 0 disables the search."
    )
    retrieval_top_k: int = Field(3, ge=0, description="Related earlier TILs given to the model; 0 disables.")
    index_tils: bool = Field(True, description="Index finished TILs and questions in the retriever.")

    max_active: int = Field(128, ge=1, description="Calls the edge runs at once.")
    max_waiting: int = Field(512, ge=0, description="Calls that may wait for a slot; more are refused.")

    warmup_timeout_s: float = Field(
        900.0, gt=0, description="How long to wait for the generator at start before giving up."
    )

    @field_validator("generator_addr", "retriever_addr", "cacher_addr")
    @classmethod
    def _valid_target(cls, value: str) -> str:
        channel_target(value)
        return value.strip()

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name such as Asia/Seoul") from None
        return value

    @model_validator(mode="after")
    def _default_within_limit(self) -> EdgeSettings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})"
            )
        return self

    @property
    def generator_target(self) -> str:
        return channel_target(self.generator_addr)

    @property
    def retriever_target(self) -> str:
        return channel_target(self.retriever_addr)

    @property
    def cacher_target(self) -> str:
        return channel_target(self.cacher_addr)
