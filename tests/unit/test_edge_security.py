"""The edge keeps secrets out of prompts, caches, indexes and logs, acts for the authenticated caller only,
and limits each caller (fakes behind the edge, as in test_edge_service.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from til.v1 import edge_pb2

from services.common.admission import Admission
from services.common.auth import caller_identity
from services.common.errors import ResourceExhausted
from tests.unit.test_edge_service import (
    DIFF,
    FakeGenerator,
    edge_stack,
    questions_request,
    revise_request,
    split,
    til_request,
)

# Fake credentials in the shapes real ones have (AWS's documented example pair).
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
DB_PASSWORD = "correct-horse-battery-staple"
GITHUB_TOKEN = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
SECRETS = (AWS_ID, AWS_SECRET, DB_PASSWORD, GITHUB_TOKEN)

SECRET_DIFF = DIFF + (
    "diff --git a/config/settings.env b/config/settings.env\n"
    "--- a/config/settings.env\n"
    "+++ b/config/settings.env\n"
    "@@ -1 +1,3 @@\n"
    f"+AWS_ACCESS_KEY_ID={AWS_ID}\n"
    f"+AWS_SECRET_ACCESS_KEY={AWS_SECRET}\n"
    f'+db_password = "{DB_PASSWORD}"\n'
)

TOKENS = {
    "alice": "alice-token-0123456789",
    "bob": "bob-token-0123456789ab",
    "ops": "ops-token-0123456789abc",
}
AUTH = ",".join(f"{who}:{token}" for who, token in TOKENS.items())


def as_(who: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[who]}"),)


def leaked(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


async def test_secrets_in_a_diff_reach_no_prompt_cache_index_or_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with edge_stack() as stack:
        request = til_request(diff=SECRET_DIFF, commit_messages=[f"rotate token {GITHUB_TOKEN}"])
        started, _, finished = split(await stack.til(request))
        await stack.settle()
        replayed, _, _ = split(await stack.til(request))  # the same secrets hit the same (clean) entry

    prompt = "\n".join(m.content for m in stack.generator.requests[0].chat.messages)
    assert leaked(prompt) == []
    for marker in ("aws-access-key-id", "aws-secret-access-key", "password-assignment", "github-token"):
        assert f"[REDACTED:{marker}]" in prompt  # redacted, not dropped: the model still sees the change
    assert "+AWS_ACCESS_KEY_ID=[REDACTED:aws-access-key-id]" in prompt
    (notice,) = [n for n in started.notices if n.startswith("secrets were found")]
    assert "aws-access-key-id" in notice and "github-token" in notice and leaked(notice) == []
    assert replayed.cache_status == edge_pb2.CACHE_STATUS_HIT

    stored = [put.value_json for put in stack.cacher.puts] + [put.key for put in stack.cacher.puts]
    indexed = [str(document) for document in stack.retriever.upserts]
    searched = [str(search) for search in stack.retriever.searches]
    assert stored and indexed and searched
    assert leaked("\n".join(stored + indexed + searched)) == []
    assert leaked("\n".join(r.getMessage() for r in caplog.records)) == []
    assert leaked(str(finished)) == []


async def test_prompts_and_diffs_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with edge_stack() as stack:
        await stack.til(til_request())
        await stack.settle()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert 'cache.set(f"user:{user_id}"' not in text and "You write formal" not in text


async def test_revisions_and_questions_are_redacted_too() -> None:
    async with edge_stack() as stack:
        revise = split(
            [r async for r in stack.stub.ReviseTil(revise_request(instruction=f"토큰 {GITHUB_TOKEN} 추가"))]
        )
        questions = [
            r
            async for r in stack.stub.GenerateQuestions(
                questions_request(til_text=f"# TIL\n- AWS 키는 {AWS_ID} 이다.")
            )
        ]
    for request in stack.generator.requests:
        assert leaked("\n".join(m.content for m in request.chat.messages)) == []
    assert any("github-token" in n for n in revise[0].notices)
    assert any("aws-access-key-id" in n for n in questions[0].started.notices)


# --- bearer tokens and owners -----------------------------------------------------------------------


async def test_a_caller_acts_as_itself_unless_it_is_an_admin() -> None:
    async with edge_stack(auth_tokens=AUTH, admin_identities="ops") as stack:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stack.til(til_request(owner=""))
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await stack.til(til_request(owner="bob"), metadata=as_("alice"))
        with pytest.raises(grpc.aio.AioRpcError) as other_questions:
            [
                r
                async for r in stack.stub.GenerateQuestions(
                    questions_request(owner="bob"), metadata=as_("alice")
                )
            ]
        own = split(await stack.til(til_request(owner=""), metadata=as_("alice")))
        await stack.settle()
        admin = split(await stack.til(til_request(owner="bob"), metadata=as_("ops")))
        await stack.settle()

    assert missing.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert other.value.code() is other_questions.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "'alice' may only act as owner 'alice'" in (other.value.details() or "")
    assert own[2].til_json and admin[0].model
    # No owner means the caller's own data: alice's search and index entry are scoped to alice.
    owners = [search.filter.owner for search in stack.retriever.searches]
    assert owners == ["alice", "bob"]
    assert [document.owner for document in stack.retriever.upserts] == ["alice", "bob"]
    assert len(stack.generator.requests) == 2  # refused calls never reached the generator


async def test_one_caller_cannot_take_every_slot() -> None:
    generator = FakeGenerator(hang_after=1)
    admission = Admission(
        "edge-per-client", max_active=8, max_waiting=8, max_per_client=2, retry_after_s=0.25
    )
    async with edge_stack(generator=generator, admission=admission, auth_tokens=AUTH) as stack:
        busy = []
        for i in range(2):
            call = stack.stub.GenerateTil(
                til_request(owner="", cache_policy=edge_pb2.CACHE_POLICY_BYPASS, date=f"2024-05-0{i + 1}"),
                metadata=as_("alice"),
            )
            await call.read()
            busy.append(call)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.til(
                til_request(owner="", cache_policy=edge_pb2.CACHE_POLICY_BYPASS), metadata=as_("alice")
            )
        bob = stack.stub.GenerateTil(
            til_request(owner="", cache_policy=edge_pb2.CACHE_POLICY_BYPASS), metadata=as_("bob")
        )
        assert (await bob.read()).WhichOneof("event") == "started"
        for call in [*busy, bob]:
            call.cancel()
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "caller 'alice'" in (refused.value.details() or "")
    assert ("retry-after-ms", "250") in tuple(refused.value.trailing_metadata() or ())


async def test_admission_limits_each_identity_and_frees_its_slots() -> None:
    admission = Admission("per-client-unit", max_active=4, max_waiting=4, max_per_client=1)
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold(who: str) -> None:
        caller_identity.set(who)
        async with admission.slot():
            held.set()
            await release.wait()

    first = asyncio.ensure_future(hold("team-a"))
    await held.wait()

    async def try_slot(who: str) -> Any:
        caller_identity.set(who)
        async with admission.slot():
            return who

    with pytest.raises(ResourceExhausted, match="at most 1 per caller"):
        await try_slot("team-a")
    assert await try_slot("team-b") == "team-b"
    release.set()
    await first
    assert await try_slot("team-a") == "team-a"  # freed when the first call ended
