"""Request checks every contract shares: owner, cache policy, dates and the output budget."""

from __future__ import annotations

import datetime
import re

from til.v1 import edge_pb2, generator_pb2

from services.common.auth import caller_identity
from services.common.errors import InvalidArgument, PermissionDenied
from services.edge.config import EdgeSettings

MAX_OWNER_CHARS = 200
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def check_owner(owner: str, settings: EdgeSettings) -> str:
    """The owner a call acts for. With auth on, it is the caller's identity by default, and only an
    admin identity (EDGE_ADMIN_IDENTITIES) may name another owner. With auth off, "" is an owner of
    its own, never "every owner"."""
    if len(owner) > MAX_OWNER_CHARS:
        raise InvalidArgument(f"owner has {len(owner)} characters; at most {MAX_OWNER_CHARS}")
    if not settings.auth_enabled:
        return owner
    caller = caller_identity.get()
    if not owner:
        return caller
    if owner != caller and caller not in settings.admins:
        raise PermissionDenied(f"caller {caller!r} may only act as owner {caller!r}, not {owner!r}")
    return owner


_POLICIES = frozenset(edge_pb2.CachePolicy.values())


def check_policy(policy: int) -> None:
    if policy not in _POLICIES:
        raise InvalidArgument(f"cache_policy {policy} is unknown; use UNSPECIFIED, REFRESH or BYPASS")


def parse_date(value: str, field: str = "date") -> str:
    if not _DATE.fullmatch(value):
        raise InvalidArgument(f"{field} {value!r} is not in YYYY-MM-DD form, e.g. 2024-05-01")
    try:
        datetime.date.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(f"{field} {value!r} is not a real calendar date") from None
    return value


def check_max_tokens(generation: edge_pb2.GenerationOverrides, limit: int) -> int | None:
    """The caller's max_tokens, if set and within `limit`."""
    if not generation.HasField("max_tokens"):
        return None
    value = generation.max_tokens
    if value < 1:
        raise InvalidArgument("generation.max_tokens must be at least 1 (leave it unset for the default)")
    if value > limit:
        raise InvalidArgument(f"generation.max_tokens is {value}; at most {limit} is allowed")
    return value


def check_ignore_eos(generation: edge_pb2.GenerationOverrides, *, allowed: bool) -> bool:
    """The caller's ignore_eos: a benchmark's way to get the same number of tokens from every request."""
    if generation.ignore_eos and not allowed:
        raise InvalidArgument(
            "generation.ignore_eos is for benchmarks: only GenerateTil takes it, and only on an edge started "
            "with EDGE_ALLOW_IGNORE_EOS=true"
        )
    return generation.ignore_eos


def resolve_max_tokens(requested: int | None, default: int, info: generator_pb2.GetModelInfoResponse) -> int:
    """The output budget: the caller's, or the default, never above what the model serves per request."""
    served = info.default_max_tokens or None
    if requested is not None:
        if served is not None and requested > served:
            raise InvalidArgument(
                f"generation.max_tokens is {requested}; the model {info.model!r} serves at most {served}"
            )
        return requested
    return min(default, served) if served else default
