"""Secrets in diffs are found and replaced; ordinary code is left alone."""

from __future__ import annotations

import re

import pytest

from services.common.redaction import redact

# Fake credentials in the shapes real ones have (the AWS pair is AWS's documented example).
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PRIVATE_KEY = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAx8f3\nq2V0aGluZw==\n-----END RSA PRIVATE KEY-----"
)


@pytest.mark.parametrize(
    ("text", "secret", "kind"),
    [
        (f'+aws_access_key_id = "{AWS_ID}"', AWS_ID, "aws-access-key-id"),
        (f"+AWS_SECRET_ACCESS_KEY={AWS_SECRET}", AWS_SECRET, "aws-secret-access-key"),
        (f"+key = '''{PRIVATE_KEY}'''", "MIIEowIBAAKCAQEAx8f3", "private-key"),
        ("+token: ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", "ghp_a1B2c3D4e5F6", "github-token"),
        ("+SLACK=xoxb-1234567890-abcdefghij", "xoxb-1234567890-abcdefghij", "slack-token"),
        ('+    password = "hunter2hunter2"', "hunter2hunter2", "password-assignment"),
        ("+DB_PASSWORD=correcthorsebattery", "correcthorsebattery", "password-assignment"),
        ("+url = postgres://app:s3cr3tpass@db:5432/app", "s3cr3tpass", "url-credentials"),
        (
            "+ key: AIzaSyA1234567890abcdefghijklmnopqrstuv",
            "AIzaSyA1234567890abcdefghijklmnopqrstuv",
            "google-api-key",
        ),
    ],
)
def test_secrets_are_redacted(text: str, secret: str, kind: str) -> None:
    result = redact(text)
    assert secret not in result.text
    assert f"[REDACTED:{kind}]" in result.text
    assert kind in result.kinds


def test_ordinary_code_is_untouched() -> None:
    code = (
        "+def get_password_hash(password: str) -> str:\n"
        "+    token = request.headers.get('Authorization')\n"
        "+    secret_name = settings.secret_name\n"
        "+    return hashlib.sha256(password.encode()).hexdigest()\n"
    )
    result = redact(code)
    assert result.text == code
    assert result.kinds == ()


def test_redaction_is_idempotent_and_counts_each_secret() -> None:
    text = f"+a = '{AWS_ID}'\n+b = '{AWS_ID.replace('EXAMPLE', 'EXAMPL2')}'\n"
    once = redact(text)
    assert once.kinds.count("aws-access-key-id") == 2
    assert redact(once.text).text == once.text


def _every_pattern(text: str) -> str:
    """Redaction with every pattern run, whatever the literals say (what `redact` must equal)."""
    from services.common import redaction

    for kind, pattern in redaction._PATTERNS:

        def replace(match: re.Match[str], kind: str = kind) -> str:
            secret = match.group(1) if match.re.groups else match.group(0)
            if "[REDACTED:" in secret:
                return match.group(0)
            if match.re.groups == 0:
                return f"[REDACTED:{kind}]"
            start, end = match.span(1)
            offset = match.start(0)
            return match.group(0)[: start - offset] + f"[REDACTED:{kind}]" + match.group(0)[end - offset :]

        text = pattern.sub(replace, text)
    return text


SHAPES = [
    f'aws_access_key_id = "{AWS_ID}"',
    f"AWS_SECRET_ACCESS_KEY={AWS_SECRET}",
    f"aWs key: {AWS_SECRET}",
    PRIVATE_KEY,
    "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
    "github_pat_" + "A1" * 12,
    "glpat-abcdefghij0123456789",
    "xoxb-1234567890-abcdefghij",
    "AIzaSyA1234567890abcdefghijklmnopqrstuv",
    "sk_live_abcdefghijklmnop1234",
    "sk-proj-abcdefghijklmnopqrstuvwxyz",
    "eyJhbGciOiJIUzI1.eyJzdWIiOiIxMjM0.abcdefghijkl",
    "postgres://app:s3cr3tpass@db:5432/app",
    'PassWord = "hunter2hunter2"',
    # Characters that a case-insensitive pattern matches to an ASCII letter, though not by lower().
    'paſſword = "hunter2hunter2"',
    'clİent_secret = "hunter2hunter2"',
    'ACCESS_\u212aEY = "hunter2hunter2"',
    "  db_password: correcthorse",
    "export API_TOKEN=correcthorsebattery",
    "def lookup(user_id):\n    return cache.get(user_id)",
]


@pytest.mark.parametrize("seed", range(40))
def test_skipping_patterns_whose_literals_are_absent_changes_nothing(seed: int) -> None:
    import random

    rng = random.Random(seed)
    text = "\n".join(
        "+" + rng.choice(SHAPES) if rng.random() < 0.5 else f"+{rng.choice(SHAPES)} {rng.choice(SHAPES)}"
        for _ in range(rng.randint(1, 6))
    )
    assert redact(text).text == _every_pattern(text)


def test_the_edge_redacts_a_text_asked_again_from_memory_with_the_same_result_and_kinds() -> None:
    from services.edge import redaction

    text = f"+DB_PASSWORD=correcthorsebattery\n+x = 1  # {'n' * 20}\n"
    first: list[str] = []
    second: list[str] = []
    assert redaction.redact_text(text, first) == redaction.redact_text(text, second) == redact(text).text
    assert first == second == ["password-assignment"]  # counted for every request, remembered or not
    recent = redaction._redacted
    for i in range(recent.max_entries + 10):
        redaction.redact_text(f"+line {i}\n", [])
    assert len(recent) == recent.max_entries and text not in recent
    huge = "+" + "x" * recent.max_size
    redaction.redact_text(huge, [])
    assert huge not in recent


def test_each_case_insensitive_pattern_and_its_twin_on_the_lowered_text_find_the_same_secrets() -> None:
    """`redact` runs a case-insensitive pattern as a case-sensitive twin on the text lower-cased: the same
    matches at the same offsets, also for characters that match an ASCII letter only case-insensitively."""
    import random

    from services.common import redaction

    folding = [chr(c) for c in range(0x250) if re.fullmatch("[a-z]", chr(c), re.IGNORECASE)]
    folding += ["\u0130", "\u0131", "\u017f", "\u212a", "\u1e9e", "\u03a3"]
    pieces = [
        *folding,
        *"=:'\" \t\n-_./+[]$#",
        "password",
        "PassWord",
        "tOkEn",
        "aWs",
        "key",
        "SECRET",
        "ſecret",
    ]
    twins = redaction._TWINS
    assert set(twins) == {i for i, (_, p) in enumerate(redaction._PATTERNS) if p.flags & re.IGNORECASE}
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 60)))
        text += rng.choice(["", " = 'hunter2hunter2'", ": correcthorse", "=" + AWS_SECRET])
        lowered = redaction._lowered(text)
        assert len(lowered) == len(text)
        for index, twin in twins.items():
            pattern = redaction._PATTERNS[index][1]
            expected = [(m.span(), m.span(1)) for m in pattern.finditer(text)]
            assert [(m.span(), m.span(1)) for m in twin.finditer(lowered)] == expected, (index, text)
