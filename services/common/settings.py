"""Settings every service shares; each service subclasses `ServerSettings` with its own env prefix."""

from __future__ import annotations

from typing import TypeVar

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MAX_GRPC_MS = 2**31 - 1
"""gRPC's channel arguments are C ints: the longest duration one can hold, in milliseconds."""


class ServerSettings(BaseSettings):
    """How a service listens. Read from the environment with the service's prefix (e.g. EDGE_PORT)."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 or [::] in containers.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 disables.")
    grace_period_s: float = Field(
        20.0, ge=0, description="On SIGTERM, how long in-flight calls may take to finish."
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request or response message accepted."
    )
    # A connection is sent GOAWAY after max_connection_age_s (so clients re-resolve and new replicas get
    # traffic); calls already on it then have max_connection_age_grace_s to finish before it is cut. The
    # grace must be at least the longest deadline a call may carry, or long streams are lost.
    max_connection_age_s: float = Field(
        300.0,
        ge=0,
        le=MAX_GRPC_MS / 1000,
        description="Age after which a connection takes no new calls (GOAWAY); 0: connections never age.",
    )
    max_connection_age_grace_s: float = Field(
        86_400.0,
        ge=0,
        le=MAX_GRPC_MS / 1000,
        description="How long calls on an aged connection may still run before it is closed; keep it at "
        "least the longest deadline a caller sets (the CLI's is 600 s).",
    )
    log_level: str = Field("INFO")
    log_json: bool = Field(False, description="Log one JSON object per line (for log collectors).")

    # TLS: plaintext unless a certificate is set; mutual TLS when a client CA is set too.
    tls_cert_file: str = Field("", description="PEM certificate chain the server presents.")
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file.")
    tls_client_ca_file: str = Field(
        "", description="PEM CA bundle; when set, clients must present a cert it signed."
    )

    # Bearer-token auth: callers send `authorization: Bearer <token>`; health and reflection stay open.
    auth_tokens: str = Field(
        "", description="Comma-separated `identity:token` pairs; empty with no file turns auth off."
    )
    auth_tokens_file: str = Field("", description="File with one `identity:token` pair per line.")

    @model_validator(mode="after")
    def _tls_pairs(self) -> ServerSettings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("set both tls_cert_file and tls_key_file, or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    def token_identities(self) -> dict[str, str]:
        """Maps each accepted token to the caller identity it stands for."""
        lines = [item for item in self.auth_tokens.split(",") if item.strip()]
        if self.auth_tokens_file:
            with open(self.auth_tokens_file, encoding="utf-8") as f:
                lines += [line for line in f if line.strip() and not line.lstrip().startswith("#")]
        tokens: dict[str, str] = {}
        for line in lines:
            identity, sep, token = line.strip().partition(":")
            if not sep or not identity or len(token) < 16:
                raise ValueError("auth tokens must be `identity:token` pairs with tokens of 16+ characters")
            tokens[token] = identity
        return tokens


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S]) -> S:
    """Reads settings, turning a validation error into one readable line that names the variable."""
    from pydantic import ValidationError

    try:
        return cls()
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        problems = "; ".join(
            f"{prefix}{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise SystemExit(f"invalid settings: {problems}") from None
