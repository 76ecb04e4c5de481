"""Chaos probes for a live edge (any `velo-edged` address, plaintext gRPC):

    fuzz_edge         malformed AskRequest bytes: the edge must answer each with a status a
                      client can act on (never UNKNOWN or INTERNAL) and stay up
    isolation_probes  every tenant holds the same questions with its own answers: a reuse
                      (Action A) must always serve the asking tenant's own answer

Both are deterministic for a seed (the payloads, the probe order); the statuses may vary with
timing (RESOURCE_EXHAUSTED under load). They import nothing from the test suite, so a chaos
tool can run them against a deployed edge.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from velo.cache import VectorCache
from velo.embedder import Embedder
from velo.v1 import edge_pb2, edge_pb2_grpc

ASK = "/velo.v1.EdgeService/Ask"
ASK_STREAM = "/velo.v1.EdgeService/AskStream"
GET_STATS = "/velo.v1.EdgeService/GetStats"
RPC_TIMEOUT_S = 10.0  # a hang becomes a counted DEADLINE_EXCEEDED, never a stuck tool
# What an edge may answer to anything (README: "What edges answer to bad input"); the rest is
# a bug (UNKNOWN, INTERNAL) or worth a look (DEADLINE_EXCEEDED: a hang).
EXPECTED = frozenset({"OK", "UNAVAILABLE", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"})
MAX_PAYLOAD = 64 * 1024 - 1  # every payload but the few deliberately oversized ones
RECEIVE_LIMIT = 8 * 1024 * 1024  # edged's grpc.max_receive_message_length
MAX_SURPRISES = 20  # unexpected answers kept with their payload, as reproducers

# AskRequest field numbers (proto/velo/v1/edge.proto).
PROMPT, TENANT, REQUEST_ID, REFERENCE, MAX_TOKENS = 1, 2, 3, 4, 5
STRING_FIELDS = (PROMPT, TENANT, REQUEST_ID, REFERENCE)
VARINT, FIXED64, LEN, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5


# -- reports --------------------------------------------------------------------------------
@dataclass
class Surprise:
    """One answer outside EXPECTED, with what was sent: replay `payload` on `method`."""

    method: str
    code: str
    details: str
    payload: bytes


@dataclass
class FuzzReport:
    requests: int = 0  # sent (and answered, or timed out)
    codes: dict[str, int] = field(default_factory=dict)  # status name -> count
    unknown: int = 0
    internal: int = 0
    alive: bool = False  # after the run: GetStats and a health Check answered
    serving: bool = False  # ... and the health Check said SERVING
    seconds: float = 0.0
    surprises: list[Surprise] = field(default_factory=list)

    def count(self, method: str, code: grpc.StatusCode, details: str, payload: bytes) -> None:
        self.requests += 1
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        self.unknown += code is grpc.StatusCode.UNKNOWN
        self.internal += code is grpc.StatusCode.INTERNAL
        if code.name not in EXPECTED and len(self.surprises) < MAX_SURPRISES:
            self.surprises.append(Surprise(method, code.name, details[:500], payload))


@dataclass
class Leak:
    """A reuse that served another tenant's answer."""

    tenant: str
    prompt: str
    answer: str
    owner: str


@dataclass
class IsolationReport:
    probes: int = 0  # Ask requests sent after the seeded rows became visible
    warmup: int = 0  # Ask requests sent while waiting for them (judged the same way)
    served: int = 0  # Action A answers
    across_tenants: int = 0  # A answers that are another tenant's seeded answer: must be 0
    # A answers that are neither a seeded answer nor one the tenant got from the cloud (B/C):
    # not a proven leak, but nothing this run put in the cache.
    unexplained: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    actions: dict[str, int] = field(default_factory=dict)  # "A", "B", "C" -> count
    visible_after_s: float = 0.0  # seeding -> the edge served every tenant's rows
    seconds: float = 0.0  # the probes alone
    leaks: list[Leak] = field(default_factory=list)  # the first few, as reproducers


# -- fuzzing --------------------------------------------------------------------------------
async def fuzz_edge(address: str, requests: int = 10_000, seed: int = 0,
                    concurrency: int = 16, oversized: int = 3) -> FuzzReport:
    """Send `requests` mutated AskRequest payloads (raw bytes, no serializer) to Ask, AskStream
    and GetStats, `concurrency` at a time; `oversized` of them are about 8 MiB, around the
    edge's receive limit. Then check that the edge still answers."""
    report = FuzzReport()
    jobs = payloads(seed, requests, oversized)
    options = [("grpc.max_send_message_length", -1),
               ("grpc.max_receive_message_length", RECEIVE_LIMIT)]
    started = time.monotonic()
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        calls = {ASK: channel.unary_unary(ASK), GET_STATS: channel.unary_unary(GET_STATS),
                 ASK_STREAM: channel.unary_stream(ASK_STREAM)}

        async def worker() -> None:
            # One shared iterator: payloads are generated in index order whatever the timing.
            for method, payload in jobs:
                code, details = await _send(calls[method], method, payload)
                report.count(method, code, details, payload)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    report.seconds = time.monotonic() - started
    report.alive, report.serving = await _alive(address)
    return report


async def _send(call: Callable, method: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    try:
        if method == ASK_STREAM:
            async for _ in call(payload, timeout=RPC_TIMEOUT_S):
                pass
        else:
            await call(payload, timeout=RPC_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def _alive(address: str) -> tuple[bool, bool]:
    """(answers GetStats and a health Check, the Check says SERVING), on a fresh channel."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await edge_pb2_grpc.EdgeServiceStub(channel).GetStats(
                edge_pb2.GetStatsRequest(), timeout=RPC_TIMEOUT_S)
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False, False
    return True, health.status == health_pb2.HealthCheckResponse.SERVING


def payloads(seed: int, requests: int, oversized: int = 3) -> Iterator[tuple[str, bytes]]:
    """What fuzz_edge sends, in order, as (method, payload): payload #i of a report's seed can
    be made again to replay it."""
    rng = random.Random(seed)
    big_at = {round((k + 1) * requests / (oversized + 1)) for k in range(oversized)}
    for i in range(requests):
        roll = rng.random()
        method = ASK if roll < 0.8 else ASK_STREAM if roll < 0.95 else GET_STATS
        if i in big_at:
            yield method, _oversized(rng)
            continue
        payload = _valid(rng)
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            payload = rng.choice(MUTATIONS)(rng, payload)
        yield method, payload[:MAX_PAYLOAD]


def _oversized(rng: random.Random) -> bytes:
    """Around the edge's 8 MiB receive limit: just over (refused by grpc itself), or just under
    (a prompt far longer than any edge accepts, or noise)."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.randbytes(RECEIVE_LIMIT + 1)
    if kind == 1:
        return edge_pb2.AskRequest(prompt="a" * (RECEIVE_LIMIT - 64),
                                   tenant="fuzz").SerializeToString()
    return rng.randbytes(RECEIVE_LIMIT - 1024)


PROMPTS = ("What is a vector database?", "How do I reset my router?", "Tell me a joke.",
           "Explain the TCP handshake in one sentence.", "¿Qué hora es?", "日本の首都は？")


def _valid(rng: random.Random) -> bytes:
    """A well-formed AskRequest, the seed of every mutation."""
    request = edge_pb2.AskRequest(prompt=rng.choice(PROMPTS), tenant=f"fuzz-{rng.randrange(4)}")
    if rng.random() < 0.3:
        request.request_id = f"fuzz-{rng.randrange(10**6)}"
    if rng.random() < 0.2:
        request.reference_answer = rng.choice(PROMPTS)
    if rng.random() < 0.3:
        request.max_tokens = rng.randrange(64)
    return request.SerializeToString()


# -- wire format ----------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers go on the wire as 10-byte two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _string(number: int, data: bytes) -> bytes:
    return _key(number, LEN) + _varint(len(data)) + data


# -- mutations: each takes the rng and a payload, returns a new payload ---------------------
def _flip_bits(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _insert_bytes(rng: random.Random, data: bytes) -> bytes:
    at = rng.randint(0, len(data))
    return data[:at] + rng.randbytes(rng.randint(1, 16)) + data[at:]


def _delete_bytes(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    at = rng.randrange(len(data))
    return data[:at] + data[at + rng.randint(1, 16):]


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[:rng.randint(0, len(data))]


def _random_bytes(rng: random.Random, data: bytes) -> bytes:
    return rng.randbytes(rng.choice((0, 1, 2, 8, 64, 512, 4096)))


def _duplicate_fields(rng: random.Random, data: bytes) -> bytes:
    """The same fields again (protobuf keeps the last), or a whole second message merged in."""
    if rng.random() < 0.3:
        return data + _valid(rng)
    extra = b""
    for _ in range(rng.randint(1, 4)):
        number = rng.choice((*STRING_FIELDS, MAX_TOKENS))
        if number == MAX_TOKENS:
            extra += _key(MAX_TOKENS, VARINT) + _varint(rng.randrange(2048))
        else:
            extra += _string(number, rng.choice(PROMPTS).encode())
    return data + extra if rng.random() < 0.5 else extra + data


def _unknown_field(rng: random.Random, data: bytes) -> bytes:
    # 0 and 19000-19999 are not valid field numbers at all; wire types 6 and 7 do not exist;
    # a group start without its end is malformed.
    number = rng.choice((0, 6, 7, 15, 16, 100, 1000, 19000, 19999, 2**29 - 1))
    wire = rng.choice((VARINT, FIXED64, LEN, START_GROUP, END_GROUP, FIXED32, 6, 7))
    body = {VARINT: _varint(rng.getrandbits(64)), FIXED64: rng.randbytes(8),
            LEN: _varint(8) + rng.randbytes(8), FIXED32: rng.randbytes(4)}.get(wire, b"")
    field_bytes = _key(number, wire) + body
    at = rng.choice((0, len(data)))
    return data[:at] + field_bytes + data[at:]


def _huge_length(rng: random.Random, data: bytes) -> bytes:
    number = rng.choice((*STRING_FIELDS, MAX_TOKENS, 9))
    length = rng.choice((2**16, 2**31 - 1, 2**31, 2**32, 2**32 + 5, 2**63, 2**64 - 1))
    return data + _key(number, LEN) + _varint(length) + rng.randbytes(rng.randint(0, 32))


INVALID_UTF8 = (b"\xff", b"\xfe\xfe", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80",
                b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80", b"caf\xe9", b"\xf8\x88\x80\x80\x80")


def _invalid_utf8(rng: random.Random, data: bytes) -> bytes:
    text = rng.choice(PROMPTS).encode()
    at = rng.randint(0, len(text))
    return data + _string(rng.choice(STRING_FIELDS), text[:at] + rng.choice(INVALID_UTF8)
                          + text[at:])


def _long_field(rng: random.Random, data: bytes) -> bytes:
    """A tenant, prompt, request id or reference answer just over its limit, or far over."""
    number = rng.choice(STRING_FIELDS)
    length = rng.choice((65, 129, 8001, 32_001, MAX_PAYLOAD - len(data) - 16))
    char = rng.choice(("a", "é", "日", "\U0001f600", " "))
    text = (char * length).encode()[:max(0, MAX_PAYLOAD - len(data) - 16)]
    return data + _string(number, text.decode(errors="ignore").encode())


def _bad_max_tokens(rng: random.Random, data: bytes) -> bytes:
    value = rng.choice((-1, -(2**31), 2**31 - 1, 2**31, 2**32 + 7, 2**63, 2**64 - 1, 1025))
    if rng.random() < 0.2:  # the right field number with the wrong wire type
        return data + _key(MAX_TOKENS, rng.choice((FIXED64, FIXED32, LEN))) + b"\x01" * 8
    return data + _key(MAX_TOKENS, VARINT) + _varint(value)


BAD_TENANTS = ("acme\n", "\nacme", "ac\x00me", "a\tb", "a\rb", "\x1b[31mred", "a b", "acme\u2028",
               "ténant", 'a"b', "a' or '1'='1", 'x" || tenant != "', "a\\", "", " ", "../etc",
               "a" * 65, "\x7f", "acme\x00")


def _bad_tenant(rng: random.Random, data: bytes) -> bytes:
    return data + _string(TENANT, rng.choice(BAD_TENANTS).encode())


def _control_chars(rng: random.Random, data: bytes) -> bytes:
    """Control characters, newlines and NULs in any string field (valid UTF-8)."""
    text = "".join(rng.choice("\x00\x01\n\r\t\x1b\x7f\u2028\ufeff a") for _ in range(24))
    return data + _string(rng.choice(STRING_FIELDS), text.encode())


MUTATIONS = (_flip_bits, _insert_bytes, _delete_bytes, _truncate, _random_bytes,
             _duplicate_fields, _unknown_field, _huge_length, _invalid_utf8, _long_field,
             _bad_max_tokens, _bad_tenant, _control_chars)


# -- tenant isolation -----------------------------------------------------------------------
TOPICS = ("houseplants", "sourdough bread", "mountain bikes", "espresso machines",
          "vinyl records", "electric kettles", "wool sweaters", "aquarium fish",
          "leather boots", "cast iron pans", "acoustic guitars", "solar panels",
          "sailing boats", "chess openings", "bonsai trees", "film cameras")
TEMPLATES = ("How do I take care of {}?", "What is the history of {}?",
             "Why do people like {}?", "What goes wrong most often with {}?")
# Light paraphrases: a reuse of them is still a reuse, and must still stay in its tenant.
PARAPHRASES: tuple[Callable[[str], str], ...] = (
    str.lower, lambda q: q.rstrip("?"), lambda q: "Please tell me: " + q,
    lambda q: q + " Thanks!", lambda q: q.replace(" ", "  "),
)


# Tenant names that differ by case, by a suffix or by one character: a filter that compared
# prefixes, ignored case or matched patterns would mix them up.
NEAR_SUFFIXES = ("a", "A", "a0", "a00", "a.", "a-", "a_", "aa", "b", "B", "a.b", "a-b", "a_b",
                 "ab", "0", "00")


def tenant_suffixes(count: int) -> list[str]:
    return [*NEAR_SUFFIXES[:count], *(f"t{k}" for k in range(len(NEAR_SUFFIXES), count))]


def isolation_questions(count: int) -> list[str]:
    """`count` distinct questions, the first ones on different topics."""
    if not 1 <= count <= len(TOPICS) * len(TEMPLATES):
        raise ValueError(f"questions must be between 1 and {len(TOPICS) * len(TEMPLATES)}")
    return [TEMPLATES[i // len(TOPICS)].format(TOPICS[i % len(TOPICS)]) for i in range(count)]


async def isolation_probes(address: str, cache: VectorCache, embedder: Embedder,
                           probes: int = 10_000, tenants: int = 8, questions: int = 12,
                           seed: int = 0, concurrency: int = 8,
                           visible_timeout_s: float = 60.0) -> IsolationReport:
    """Seed the edge's collection through `cache` (a client of its own, as another process
    would be) so that every tenant holds the same questions with its own answers, wait until
    the edge serves them, then send `probes` Asks as random tenants and judge every answer.

    The edge keeps evicting as it serves (below the mean value every `cache.eviction_every`
    requests once it holds `cache.eviction_min_rows` rows, 200 by default): on a fuller edge
    seeded rows go too, and their probes are answered B (or UNAVAILABLE without a cloud).
    `tenants * questions * 2` rows below that keeps a fresh edge serving them all."""
    rng = random.Random(seed)
    run = secrets.token_hex(4)  # tenants no one else uses, whatever the seed
    names = [f"iso-{run}-{suffix}" for suffix in tenant_suffixes(tenants)]
    asked = isolation_questions(questions)
    seeded = {t: [f"[{t}] answer {i}: what {t} says about {q!r}" for i, q in enumerate(asked)]
              for t in names}
    q_vecs = await asyncio.to_thread(embedder.embed, asked)
    for tenant in names:
        a_vecs = await asyncio.to_thread(embedder.embed, seeded[tenant])
        for i, question in enumerate(asked):
            await asyncio.to_thread(cache.insert_pair, tenant, question, seeded[tenant][i],
                                    q_vecs[i], a_vecs[i], -1.0)
    judge = _Judge(IsolationReport(), seeded)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = edge_pb2_grpc.EdgeServiceStub(channel)
        started = time.monotonic()
        # The edge's own client sees rows written by another within Milvus's Bounded
        # staleness (~5 s): wait until every tenant's last row is served.
        waiting = set(names)
        while waiting:
            if time.monotonic() - started > visible_timeout_s:
                raise TimeoutError(f"edge {address} did not serve the seeded rows of "
                                   f"{sorted(waiting)} within {visible_timeout_s} s")
            for tenant in sorted(waiting):
                reply = await judge.ask(stub, tenant, asked[-1], warmup=True)
                if reply is not None and reply.answer == seeded[tenant][-1]:
                    waiting.discard(tenant)
            await asyncio.sleep(0.2)
        judge.report.visible_after_s = time.monotonic() - started

        plan = iter([(rng.choice(names), _probe_text(rng, asked)) for _ in range(probes)])

        async def worker() -> None:
            for tenant, prompt in plan:
                await judge.ask(stub, tenant, prompt)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        judge.report.seconds = time.monotonic() - started
    return judge.report


def _probe_text(rng: random.Random, asked: list[str]) -> str:
    question = rng.choice(asked)
    return rng.choice(PARAPHRASES)(question) if rng.random() < 0.3 else question


class _Judge:
    """Sends one probe and checks its answer against who owns it."""

    def __init__(self, report: IsolationReport, seeded: dict[str, list[str]]) -> None:
        self.report = report
        self.owner = {answer: t for t, answers in seeded.items() for answer in answers}
        # Answers a tenant got from the cloud (B/C) are its own to reuse later.
        self.learned: dict[str, set[str]] = {t: set() for t in seeded}

    async def ask(self, stub: edge_pb2_grpc.EdgeServiceStub, tenant: str, prompt: str,
                  warmup: bool = False) -> edge_pb2.AskResponse | None:
        report = self.report
        if warmup:
            report.warmup += 1
        else:
            report.probes += 1
        try:
            reply = await stub.Ask(edge_pb2.AskRequest(prompt=prompt, tenant=tenant),
                                   timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            report.codes[exc.code().name] = report.codes.get(exc.code().name, 0) + 1
            return None
        report.codes["OK"] = report.codes.get("OK", 0) + 1
        letter = {edge_pb2.ACTION_REUSE: "A", edge_pb2.ACTION_FORWARD: "B",
                  edge_pb2.ACTION_AUGMENT: "C"}.get(reply.action, "?")
        report.actions[letter] = report.actions.get(letter, 0) + 1
        if letter != "A":
            self.learned[tenant].add(reply.answer)
            return reply
        report.served += 1
        owner = self.owner.get(reply.answer)
        if owner == tenant or (owner is None and reply.answer in self.learned[tenant]):
            return reply
        if owner is None:
            report.unexplained += 1
        else:
            report.across_tenants += 1
            if len(report.leaks) < MAX_SURPRISES:
                report.leaks.append(Leak(tenant, prompt, reply.answer, owner))
        return reply
