"""A labelled retrieval set that reads like real TILs: Korean prose around code identifiers.

Everything is generated from the vocabulary below with a seeded RNG, so the set is the same on
every machine. Each labelled document pairs one code identifier with two Korean concepts; the pair
of concepts is unique across the labelled set, and an identifier's documents never share a concept.
A query names its target document's concepts with *different* particles than the document uses
(Korean attaches particles to words, so whole words rarely match) and, where it names the
identifier, usually spells it in another style (camelCase for snake_case, ...). So each query has
exactly one relevant document, and the documents that share its identifier or one of its concepts
are hard negatives.

Query types:
- ``full``: both concepts and the identifier.
- ``korean``: both concepts, no identifier (pure Korean).
- ``identifier``: the identifier and one concept.

Distractors (to grow the collection to 10k or 100k documents) use other identifiers and concept
pairs that no labelled document uses, so they can never be relevant to a labelled query. Templates
and fillers contain no concept word (checked when the set is built), so a document names exactly its
own two concepts.

Every other query (by number) is held out: `split` is "tune" or "held-out", so that a change judged
on one half can be checked on the other.

    python -m bench.retrieval.dataset --out /tmp/retrieval-set.json   # dump the labelled set
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Multi-word identifiers, written in one of four styles per document.
WORD_IDENTIFIERS: tuple[tuple[str, ...], ...] = tuple(
    tuple(s.split())
    for s in """
    connection pool size|max retries|retry with backoff|parse http header|request timeout|cache key prefix
    user session store|token bucket limiter|batch insert rows|read replica lag|event loop policy|task group
    graceful shutdown hook|health check interval|circuit breaker state|message queue consumer
    dead letter queue|idempotency key|rate limit window|feature flag client|config loader|log level
    trace span id|metrics exporter|worker pool|thread local storage|lazy import|dependency injector
    schema migration|foreign key constraint|index hint|query planner cost|json schema validator
    protobuf descriptor|grpc channel options|stream observer|backpressure buffer|chunk size|file watcher
    hot reload|build cache dir|docker layer cache|pod disruption budget|horizontal pod autoscaler
    liveness probe|readiness gate|secret mount path|ingress route|tls cert chain|password hash rounds
    jwt expiry claim|oauth refresh token|csrf token header|cors allowed origins|unicode normalizer
    korean tokenizer|embedding cache|vector index|sparse vector|reranker score|prompt template
    kv cache blocks|speculative decoding|tensor parallel size|gpu memory utilization
    sampling temperature|stop sequence|tokenizer vocab""".replace("\n", "|").split("|")
    if s.strip()
)
# Library paths, always written as they are.
PATH_IDENTIFIERS = (
    "asyncio.Queue", "asyncio.TaskGroup", "functools.lru_cache", "itertools.groupby",
    "collections.defaultdict", "contextlib.ExitStack", "typing.Protocol", "dataclasses.replace",
    "pathlib.Path", "subprocess.run", "threading.Lock", "json.loads", "re.compile", "os.environ",
    "logging.getLogger", "time.perf_counter", "heapq.nlargest", "bisect.insort", "weakref.finalize",
    "signal.SIGTERM",
)  # fmt: skip

CONCEPTS = _words(
    """캐시 트랜잭션 커넥션 타임아웃 재시도 로그 인덱스 마이그레이션 직렬화 스레드 잠금 메모리 배포 테스트
    이벤트 대기열 스케줄러 권한 인증서 세션 쿠키 토큰 요청 응답 헤더 스트림 버퍼 파일 디렉터리 환경변수
    설정값 프로세스 신호 컨테이너 이미지 레이어 클러스터 노드 데이터베이스 테이블 쿼리 결과 오류 예외 경고
    성능 지연시간 처리량 동시성 병렬성 모델 임베딩 벡터 검색 점수 순위 문서 형태소 문자열 정규식 딕셔너리
    리스트 함수 클래스 모듈 패키지 의존성 빌드 커밋 브랜치 리뷰 충돌 백업 복구 암호화 압축 인코딩 파서
    라우터 미들웨어 핸들러 콜백 제너레이터 코루틴"""
)

# Words that distractor identifiers are made of (some shared with the labelled ones on purpose).
DISTRACTOR_WORDS = _words(
    """user order invoice payment cart item stock price tax report export import sync async job task queue
    cache store index search rank score vector model prompt token session cookie header body stream chunk
    file path dir config env flag level limit window retry timeout pool worker thread lock event loop
    signal hook probe health metric trace span log audit backup snapshot restore shard replica leader
    follower node pod image layer build deploy release branch commit review merge diff patch"""
)

FILLERS = (
    "처음에는 잘 이해가 안 됐는데 직접 해 보니 감이 왔다.",
    "다음에는 재현 코드를 먼저 작성해야겠다.",
    "공식 안내서를 다시 읽어 보니 분명히 적혀 있었다.",
    "팀원에게 물어보고 나서야 원인을 찾았다.",
    "이 내용은 나중에 따로 글로 정리해 둘 생각이다.",
    "생각보다 간단한 문제였지만 시간이 꽤 걸렸다.",
    "로컬에서는 재현되지 않아서 한참 헤맸다.",
    "PR 설명에 이 내용을 꼭 남겨 두자.",
    "It turned out to be a one-line fix.",
    "See the upstream issue for the full discussion.",
)

# Particle pairs: (after a final consonant, after a vowel).
PARTICLES = {
    "object": ("을", "를"),
    "subject": ("이", "가"),
    "topic": ("은", "는"),
    "and": ("과", "와"),
    "with": ("으로", "로"),
    "at": ("에서", "에서"),
    "to": ("에", "에"),
    "of": ("의", "의"),
    "also": ("도", "도"),
    "only": ("만", "만"),
}


def has_final_consonant(word: str) -> bool:
    last = word[-1]
    return "가" <= last <= "힣" and (ord(last) - 0xAC00) % 28 != 0


def attach(word: str, role: str) -> str:
    """`word` with the particle of `role` in the form its last syllable takes (캐시를, 트랜잭션을)."""
    consonant, vowel = PARTICLES[role]
    return word + (consonant if has_final_consonant(word) else vowel)


def render(words: tuple[str, ...], style: str) -> str:
    if style == "snake":
        return "_".join(words)
    if style == "kebab":
        return "-".join(words)
    if style == "camel":
        return words[0] + "".join(w.capitalize() for w in words[1:])
    if style == "pascal":
        return "".join(w.capitalize() for w in words)
    raise ValueError(style)


STYLES = ("snake", "camel", "pascal", "kebab")


@dataclass(frozen=True)
class Identifier:
    words: tuple[str, ...] = ()
    path: str = ""  # a library path, written as is

    def spelled(self, style: str) -> str:
        return self.path or render(self.words, style)

    def other_spelling(self, style: str, rng: random.Random) -> str:
        """How a query names it: another style, or for a path the path or its last part."""
        if self.path:
            return rng.choice([self.path, self.path.rsplit(".", 1)[1]])
        return render(self.words, rng.choice([s for s in STYLES if s != style]))


# (template, role of {a}, role of {b}); {i} is the identifier.
DOC_TEMPLATES = {
    "til": (
        ("오늘 {i}로 {a} {b} 다루는 방법을 배웠다.", "object", "at"),
        ("{a} 자꾸 실패해서 살펴보니 {i} 때문이었다. {b} 바꾸니 해결됐다.", "subject", "object"),
        ("{i}는 {a} {b} 함께 쓸 때 조심해야 한다.", "and", "object"),
        ("{b} {a} 넣기 전에 {i}부터 확인하자.", "object", "to"),
        ("동료에게서 {i} 설정이 {a} {b} 망가뜨린다는 지적을 받았다.", "of", "object"),
        ("{a} {b} 디버깅하다가 {i}의 기본값이 원인이라는 걸 알았다.", "and", "object"),
    ),
    "question": (
        ("{i}를 쓸 때 {a} {b} 어떤 영향을 주는가?", "subject", "to"),
        ("{a} {b} 다룰 때 {i}를 써야 하는 이유는 무엇인가?", "and", "object"),
    ),
    "doc": (
        ("{i}: {a} {b} 넘긴다. 기본값은 {n}이다.", "object", "with"),
        ("{i} 레퍼런스. {a} {b} 관리한다. 자세한 설정은 {n}장을 보라.", "of", "object"),
    ),
}

# (template, role of {a}, role of {b}); {i} is the identifier in another spelling.
QUERY_TEMPLATES = {
    "full": (
        ("{a} {b} {i} 관련해서 뭘 배웠지?", "*", "*"),
        ("{i} 쓰면 {a} {b} 어떻게 되나", "*", "*"),
        ("{b} {a} {i} 정리한 글", "*", "*"),
    ),
    "korean": (
        ("{a} {b} 같이 쓸 때 주의할 점", "*", "*"),
        ("{b} {a} 문제 해결한 기록", "*", "*"),
    ),
    "identifier": (
        ("{i}에서 {a} 다루는 법", "*", ""),
        ("{i} {a} 예제", "*", ""),
    ),
}
QUERY_ROLES = ("object", "subject", "topic", "with", "at", "to", "of", "also", "only")


@dataclass
class Doc:
    id: str
    kind: str
    text: str
    identifier: str
    concepts: tuple[str, str]
    tags: list[str] = field(default_factory=list)


@dataclass
class Query:
    id: str
    type: str
    text: str
    relevant: list[str]
    split: str = "tune"


@dataclass
class LabelledSet:
    documents: list[Doc]
    queries: list[Query]


def _fill(
    template: str, role_a: str, role_b: str, a: str, b: str, identifier: str, rng: random.Random
) -> str:
    return template.format(
        i=identifier,
        a=attach(a, role_a) if role_a else a,
        b=attach(b, role_b) if role_b else b,
        n=rng.randint(2, 64),
    )


def _query_role(used: str, rng: random.Random) -> str:
    """A particle role other than the one the document used for the concept."""
    return rng.choice([r for r in QUERY_ROLES if r != used])


def check_vocabulary() -> None:
    """Fails if a template or filler contains a concept: a distractor would then name a labelled pair."""
    fixed = [*FILLERS, *(t for ts in (*DOC_TEMPLATES.values(), *QUERY_TEMPLATES.values()) for t, _, _ in ts)]
    for text in fixed:
        if clash := [c for c in CONCEPTS if c in text]:
            raise ValueError(f"the template or filler {text!r} contains the concepts {clash}")


def labelled_set(seed: int = 7, *, docs_per_identifier: int = 3) -> LabelledSet:
    check_vocabulary()
    rng = random.Random(seed)
    identifiers = [Identifier(words=w) for w in WORD_IDENTIFIERS] + [
        Identifier(path=p) for p in PATH_IDENTIFIERS
    ]
    kinds = ["til"] * 4 + ["question", "doc"]
    used_pairs: set[frozenset[str]] = set()
    documents: list[Doc] = []
    # Per document: (style, identifier, role of a, role of b), for writing its queries.
    how: dict[str, tuple[str, Identifier, str, str]] = {}
    for n, ident in enumerate(identifiers):
        while True:  # concepts of one identifier's documents are disjoint; pairs are unique overall
            concepts = rng.sample(CONCEPTS, 2 * docs_per_identifier)
            pairs = [frozenset(concepts[2 * k : 2 * k + 2]) for k in range(docs_per_identifier)]
            if not used_pairs.intersection(pairs):
                used_pairs.update(pairs)
                break
        for k in range(docs_per_identifier):
            a, b = concepts[2 * k], concepts[2 * k + 1]
            kind = rng.choice(kinds)
            template, role_a, role_b = rng.choice(DOC_TEMPLATES[kind])
            style = rng.choice(STYLES)
            spelled = ident.spelled(style)
            text = _fill(
                template, role_a, role_b, a, b, f"`{spelled}`" if rng.random() < 0.5 else spelled, rng
            )
            if rng.random() < 0.6:
                text += " " + rng.choice(FILLERS)
            doc_id = f"doc-{n:03d}-{k}"
            documents.append(Doc(doc_id, kind, text, spelled, (a, b), tags=[kind, spelled.lower()]))
            how[doc_id] = (style, ident, role_a, role_b)

    queries: list[Query] = []
    targets = rng.sample(documents, len(documents))
    plan = [("full", 60), ("korean", 40), ("identifier", 40)]
    cursor = 0
    for qtype, count in plan:
        for doc in targets[cursor : cursor + count]:
            style, ident, role_a, role_b = how[doc.id]
            a, b = doc.concepts
            template, _, slot_b = rng.choice(QUERY_TEMPLATES[qtype])
            text = template.format(
                i=ident.other_spelling(style, rng),
                a=attach(a, _query_role(role_a, rng)),
                b=attach(b, _query_role(role_b, rng)) if slot_b else b,
            )
            n = len(queries)
            queries.append(Query(f"q-{n:03d}", qtype, text, [doc.id], "tune" if n % 2 == 0 else "held-out"))
        cursor += count
    return LabelledSet(documents, queries)


def distractors(labelled: LabelledSet, count: int, seed: int = 11) -> Iterator[Doc]:
    """`count` documents that are never relevant to a labelled query (see the module docstring)."""
    rng = random.Random(seed)
    taken_identifiers = {d.identifier.lower() for d in labelled.documents}
    taken_words = {tuple(w) for w in WORD_IDENTIFIERS}
    taken_pairs = {frozenset(d.concepts) for d in labelled.documents}
    for n in itertools.count():
        if n >= count:
            return
        while True:
            words = tuple(rng.sample(DISTRACTOR_WORDS, rng.choice((2, 2, 3))))
            style = rng.choice(STYLES)
            spelled = render(words, style)
            if words not in taken_words and spelled.lower() not in taken_identifiers:
                break
        while True:
            a, b = rng.sample(CONCEPTS, 2)
            if frozenset((a, b)) not in taken_pairs:
                break
        kind = rng.choice(["til"] * 4 + ["question", "doc"])
        template, role_a, role_b = rng.choice(DOC_TEMPLATES[kind])
        text = _fill(template, role_a, role_b, a, b, spelled, rng)
        if rng.random() < 0.6:
            text += " " + rng.choice(FILLERS)
        yield Doc(f"distractor-{n:06d}", kind, text, spelled, (a, b), tags=[kind])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write the labelled set to")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    labelled = labelled_set(args.seed)
    args.out.write_text(json.dumps(asdict(labelled), ensure_ascii=False, indent=1))
    print(f"{len(labelled.documents)} documents, {len(labelled.queries)} queries -> {args.out}")


if __name__ == "__main__":
    main()
