"""Bearer-token authentication and the caller identity it yields (also used for per-client limits)."""

from __future__ import annotations

import contextvars
import hmac
from collections.abc import Mapping, Sequence

from services.common.errors import Unauthenticated

# Who is calling: the token's identity when auth is on, else the peer's address.
caller_identity: contextvars.ContextVar[str] = contextvars.ContextVar("caller_identity", default="anonymous")

# Probes and tooling must work without a token.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class BearerTokenAuth:
    """Checks `authorization: Bearer <token>` against known tokens, in constant time."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = [(token.encode(), identity) for token, identity in tokens.items()]

    def identify(self, metadata: Sequence[tuple[str, str | bytes]]) -> str:
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            raise Unauthenticated("missing `authorization: Bearer <token>` metadata")
        scheme, _, token = str(values[0]).partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be `Bearer <token>`")
        presented = token.strip().encode()
        found = None
        for known, identity in self._tokens:
            if hmac.compare_digest(known, presented):
                found = identity
        if found is None:
            raise Unauthenticated("the bearer token is not valid")
        return found


def peer_identity(peer: str) -> str:
    """`ipv4:10.0.0.7:5123` -> `10.0.0.7`: the caller's host, for limits when auth is off."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer or "anonymous"
