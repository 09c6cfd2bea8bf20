"""Cacher settings, read from CACHER_* environment variables."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings

DAY_S = 24 * 60 * 60


class CacherSettings(ServerSettings):
    """Where the cache lives and what it accepts. An empty CACHER_REDIS_URL runs a private redis-server."""

    model_config = SettingsConfigDict(env_prefix="CACHER_", extra="ignore", frozen=True)

    port: int = Field(50054, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(9094, ge=0, le=65535, description="Prometheus /metrics port; 0 disables.")

    redis_url: str = Field(
        "",
        description="redis://host:port/db, rediss://... or unix:///path.sock; empty starts a private "
        "redis-server that lives and dies with the cacher.",
    )
    redis_server_bin: str = Field("redis-server", min_length=1, description="The embedded Redis binary.")
    embedded_dir: str = Field(
        "", description="Folder for the embedded Redis's unix socket and log; empty makes a temporary one."
    )
    embedded_maxmemory: str = Field(
        "256mb",
        pattern=r"(?i)^[0-9]+(b|k|kb|m|mb|g|gb)?$",
        description="Memory cap of the embedded Redis (it then evicts least recently used keys).",
    )
    embedded_start_timeout_s: float = Field(
        10.0, gt=0, description="How long the embedded Redis may take to answer PING."
    )

    default_ttl_s: int = Field(7 * DAY_S, ge=0, description="TTL of a put without ttl_seconds; 0: none.")
    max_ttl_s: int = Field(30 * DAY_S, ge=1, description="Largest ttl_seconds a caller may ask for.")
    max_value_bytes: int = Field(1024 * 1024, ge=1, description="Largest value_json, in UTF-8 bytes.")
    max_key_bytes: int = Field(256, ge=1, description="Longest key, in UTF-8 bytes.")
    key_prefix: str = Field(
        "tilserve", pattern=r"^[A-Za-z0-9_.-]+$", description="Redis keys are <key_prefix>:<namespace>:<key>."
    )

    op_timeout_s: float = Field(
        0.1, gt=0, description="Timeout of one Redis round trip, so a stuck Redis never stalls a caller."
    )
    connect_timeout_s: float = Field(0.2, gt=0, description="Timeout of opening a Redis connection.")
    max_connections: int = Field(64, ge=1, description="Size of the Redis connection pool.")

    @field_validator("redis_url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "must start with redis://, rediss:// or unix:// (or be empty for an embedded Redis)"
            )
        if urlsplit(url).port == 0:  # .port also raises ValueError for a port that is not a number
            raise ValueError("port 0 is not a Redis port")
        return url

    @model_validator(mode="after")
    def _default_ttl_within_max(self) -> CacherSettings:
        if self.default_ttl_s > self.max_ttl_s:
            raise ValueError(
                f"CACHER_DEFAULT_TTL_S ({self.default_ttl_s}) exceeds CACHER_MAX_TTL_S ({self.max_ttl_s})"
            )
        return self
