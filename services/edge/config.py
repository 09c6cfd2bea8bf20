"""Edge settings, read from EDGE_* environment variables."""

from __future__ import annotations

import ipaddress
import os
import zoneinfo

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.channels import ClientTls
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


def available_cpus() -> int:
    """CPUs this process may run on (its affinity, so a container's cpuset counts, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class EdgeSettings(ServerSettings):
    """The public entry point and how it reaches the generator, retriever and cacher."""

    model_config = SettingsConfigDict(env_prefix="EDGE_", extra="ignore", frozen=True)

    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9091, ge=0, le=65535)

    generator_addr: str = Field(
        "127.0.0.1:50052",
        description="host:port, dns:///name:port (all replicas), or a comma list of IP:port.",
    )
    generator_connections: int = Field(
        1,
        ge=1,
        le=64,
        description="Connections to each generator address (each worker); a stream goes to the one with "
        "the fewest open. A generator with several front-ends on one port (GENERATOR_FRONTENDS) needs "
        "several: the kernel hands each connection to one front-end. About twice the front-ends "
        "spreads the streams evenly enough.",
    )
    retriever_addr: str = Field("127.0.0.1:50053")
    cacher_addr: str = Field("127.0.0.1:50054")

    timezone: str = Field("Asia/Seoul", description="Time zone of 'today', the default TIL date.")

    max_diff_bytes: int = Field(256 * 1024, ge=1, description="Largest diff accepted, in UTF-8 bytes.")
    max_commit_messages: int = Field(50, ge=0)
    max_commit_message_chars: int = Field(2000, ge=1)
    default_max_tokens: int = Field(1024, ge=1, description="Output tokens when a request sets none.")
    max_tokens_limit: int = Field(4096, ge=1, description="Most output tokens a request may ask for.")
    allow_ignore_eos: bool = Field(
        False,
        description="Let GenerateTil callers set generation.ignore_eos (benchmarks: every request then yields "
        "max_tokens tokens; such results are never complete, cached or indexed).",
    )
    max_message_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest gRPC message in or out: above max_diff_bytes plus commit messages, well below "
        "what a stream of replies would hold in memory.",
    )

    cache_ttl_s: int = Field(7 * 24 * 3600, ge=0, description="Time to live of cached results; 0 keeps them.")
    cache_timeout_s: float = Field(
        0.1, gt=0, description="Deadline of one cache call: a dead or slow cache costs at most this."
    )
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

    coalesce_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="Text deltas waiting while the edge sends one message go out merged in the next; with "
        "a value, a stream's messages are also at least this far apart (more tokens each, fewer messages). "
        "The first token is never held back.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="Edge processes sharing the port (SO_REUSEPORT), forked before any gRPC object exists; "
        "worker i serves metrics on metrics_port + i. 'auto': one per CPU this process may run on.",
    )
    near_cache_entries: int = Field(
        0,
        ge=0,
        description="Complete results each edge process keeps in memory after reading or storing them in "
        "the cacher, so a repeated request is answered without the cacher hop; 0 turns it off.",
    )
    near_cache_max_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="Memory the near cache of one edge process may hold."
    )
    near_cache_max_age_s: float = Field(
        2.0,
        ge=0,
        description="Longest a near-cache entry is served (never past the cacher's own expiry): how long a "
        "result replaced through another edge process (CACHE_POLICY_REFRESH) may still be served here.",
    )
    uvloop: bool = Field(True, description="Run the event loop on uvloop (installed with the package).")

    max_active: int = Field(128, ge=1, description="Calls the edge runs at once.")
    max_waiting: int = Field(512, ge=0, description="Calls that may wait for a slot; more are refused.")
    max_active_per_client: int = Field(
        0,
        ge=0,
        description="Calls one caller identity may have running or waiting; 0: no per-caller limit. "
        "The identity is the bearer token's when auth is on, else the peer's IP address.",
    )
    retry_after_s: float = Field(1.0, gt=0, description="Retry hint sent with RESOURCE_EXHAUSTED.")

    admin_identities: str = Field(
        "",
        description="Comma-separated caller identities that may act for any owner. Every other "
        "authenticated caller may only read and write its own data (owner = its identity).",
    )

    generator_attempts: int = Field(
        3,
        ge=1,
        description="Tries of one generation when the generator is UNAVAILABLE before its first token.",
    )
    generator_backoff_s: float = Field(
        0.1, gt=0, description="Wait before the first retry; doubled (with jitter) for each later one."
    )
    breaker_failures: int = Field(
        3,
        ge=1,
        description="Consecutive failed calls to the cache (or the retriever) after which the edge stops "
        "calling it for breaker_cool_down_s.",
    )
    breaker_cool_down_s: float = Field(
        5.0, gt=0, description="How long an open breaker skips its dependency before one probe call."
    )
    share_identical: bool = Field(
        True, description="Identical concurrent requests that miss the cache share one generation."
    )
    shared_deadline_slack_s: float = Field(
        1.0,
        ge=0,
        description="A call joins an identical generation in progress if its own deadline is at most this "
        "much later than the deadline that generation runs under.",
    )

    # TLS to the generator, retriever and cacher: plaintext unless a CA or client certificate is set.
    peer_tls_ca_file: str = Field("", description="PEM CA bundle that signed the peers' certificates.")
    peer_tls_cert_file: str = Field("", description="PEM client certificate for mutual TLS to the peers.")
    peer_tls_key_file: str = Field("", description="PEM private key of peer_tls_cert_file.")
    peer_tls_server_name: str = Field(
        "", description="Name to check the peers' certificates against, when it is not the address's host."
    )

    warmup_timeout_s: float = Field(
        900.0, gt=0, description="How long to wait for the generator at start before giving up."
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return min(256, available_cpus())
        return value

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
        # Room for the diff, the commit messages (each up to 4 bytes a character) and the framing.
        needed = (
            self.max_diff_bytes + 4 * self.max_commit_messages * self.max_commit_message_chars + 16 * 1024
        )
        if self.max_message_bytes < needed:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) cannot carry a request at the input limits "
                f"(max_diff_bytes and commit messages need {needed}): raise it or lower those limits"
            )
        return self

    @model_validator(mode="after")
    def _peer_tls_pairs(self) -> EdgeSettings:
        if bool(self.peer_tls_cert_file) != bool(self.peer_tls_key_file):
            raise ValueError("set both peer_tls_cert_file and peer_tls_key_file, or neither")
        return self

    @property
    def peer_tls(self) -> ClientTls | None:
        """TLS settings for the channels to the peers; None for plaintext."""
        if not (self.peer_tls_ca_file or self.peer_tls_cert_file):
            return None
        return ClientTls(
            ca_file=self.peer_tls_ca_file,
            cert_file=self.peer_tls_cert_file,
            key_file=self.peer_tls_key_file,
            server_name=self.peer_tls_server_name,
        )

    @property
    def auth_enabled(self) -> bool:
        """Whether callers present bearer tokens (so `caller_identity` is an authenticated name)."""
        return bool(self.auth_tokens.strip() or self.auth_tokens_file)

    @property
    def admins(self) -> frozenset[str]:
        return frozenset(name.strip() for name in self.admin_identities.split(",") if name.strip())

    @property
    def generator_target(self) -> str:
        return channel_target(self.generator_addr)

    @property
    def retriever_target(self) -> str:
        return channel_target(self.retriever_addr)

    @property
    def cacher_target(self) -> str:
        return channel_target(self.cacher_addr)
