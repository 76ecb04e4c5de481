"""Chaos probes for a live edge (any `velo-edged` address, plaintext gRPC):

    fuzz_edge         malformed AskRequest bytes: the edge must answer each with a status a
                      client can act on (never UNKNOWN or INTERNAL) and stay up
    fuzz_http         mutated requests to the OpenAI-compatible HTTP front (JSON values of the
                      wrong type, odd strings, deep nesting, broken bytes and headers): never
                      a 5xx but a deliberate 503 (the cloud is down), and the edge stays up
    isolation_probes  every tenant holds the same questions with its own answers: a reuse
                      (Action A) must always serve the asking tenant's own answer

Both are deterministic for a seed (the payloads, the probe order); the statuses may vary with
timing (RESOURCE_EXHAUSTED under load). They import nothing from the test suite, so a chaos
tool can run them against a deployed edge.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from velo.edge.cache import VectorCache
from velo.edge.embedder import Embedder
from velo.v1 import edge_pb2, edge_pb2_grpc
from velo.v1.chat_pb2 import ChatMessage

if TYPE_CHECKING:
    import httpx

ASK = "/velo.v1.EdgeService/Ask"
ASK_STREAM = "/velo.v1.EdgeService/AskStream"
GET_STATS = "/velo.v1.EdgeService/GetStats"
RPC_TIMEOUT_S = 10.0  # a hang becomes a counted DEADLINE_EXCEEDED, never a stuck tool
# What an edge may answer to anything (docs/architecture.md, "What edges answer to bad
# input"); the rest is a bug (UNKNOWN, INTERNAL) or worth a look (DEADLINE_EXCEEDED: a hang).
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
    # Probes by how they were sent: "grpc"/"http", each "+history" when earlier turns came with
    # the prompt (a conversation scope of the tenant's own).
    kinds: dict[str, int] = field(default_factory=dict)
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



# -- fuzzing the HTTP front ----------------------------------------------------------------
@dataclass
class HttpFuzzReport:
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)  # HTTP status -> count
    server_errors: int = 0  # 5xx other than 503 (and transport failures): must be 0
    unsendable: int = 0  # refused by the HTTP client itself (not sent, not counted)
    alive: bool = False  # after the run: /healthz and /v1/models answered
    seconds: float = 0.0
    surprises: list[tuple[int, str, str]] = field(default_factory=list)  # status, body, sent


VALID_BODIES: tuple[dict, ...] = (
    {"model": "velo", "messages": [{"role": "user", "content": "What is a cache?"}]},
    {"model": "velo", "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Name a prime number."}],
     "max_tokens": 16, "temperature": 0.2, "stop": ["\n"], "n": 1},
    {"model": "velo", "stream": True, "stream_options": {"include_usage": True},
     "messages": [{"role": "user", "content": "Count to three."}]},
    {"model": "velo", "messages": [{"role": "user", "content": "Give JSON."}],
     "response_format": {"type": "json_object"}},
    {"model": "velo", "messages": [{"role": "user", "content": "Weather in Paris?"}],
     "tools": [{"type": "function", "function": {"name": "weather", "parameters": {
         "type": "object", "properties": {"city": {"type": "string"}}}}}],
     "tool_choice": "auto"},
    {"model": "velo", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hello?"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "And again?"}],
     "velo": {"cache": {"no_cache": False, "no_store": True}}},
)
ODD_VALUES: tuple[object, ...] = (
    None, True, False, 0, -1, 1.5, 10**30, -(10**30), float("inf"), "", "x" * 5000,
    "hi \ud800", "\u0000\u0007\u001b[2J", "\u202e\ufeff", [], [1, "a", None], {}, {"a": {}},
    "yes", "1", ["user"], {"role": "user"},
)
PATHS = ("/v1/chat/completions",) * 8 + ("/v1/models", "/healthz", "/v1/velo/cache/entries",
                                          "/v1/velo/cache/delete", "/v1/nothing")


def _json_paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document (keys and list indexes)."""
    found = [prefix]
    if len(prefix) >= 8:  # not into a deep nest another mutation made
        return found
    if isinstance(value, dict):
        for key, item in value.items():
            found += _json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _json_paths(item, (*prefix, i))
    return found


def _replace_at(doc: object, path: tuple, value: object) -> object:
    if not path:
        return value
    parent = doc
    for step in path[:-1]:
        parent = parent[step]  # type: ignore[index]
    parent[path[-1]] = value  # type: ignore[index]
    return doc


def http_request(rng: random.Random) -> tuple[str, str, dict[str, str], bytes]:
    """(method, path, headers, body) of one mutated request."""
    path = rng.choice(PATHS)
    headers = {"content-type": "application/json"}
    if rng.random() < 0.15:
        headers["x-velo-tenant"] = rng.choice(["", "a" * 300, "../etc", "t\u00e9", "UPPER",
                                               "ok-tenant", "in side", "a\tb", "\u00ff" * 40])
    if rng.random() < 0.05:
        headers["content-type"] = rng.choice(["text/plain", "application/x-www-form-urlencoded",
                                              "application/json; charset=latin-1", ""])
    doc: object = copy.deepcopy(rng.choice(VALID_BODIES))
    huge_nest = False
    for _ in range(rng.randint(1, 3)):
        target = rng.choice(_json_paths(doc))
        choice = rng.random()
        if choice < 0.6:
            doc = _replace_at(doc, target, copy.deepcopy(rng.choice(ODD_VALUES)))
        elif choice < 0.7 and isinstance(doc, dict) and doc:
            doc.pop(rng.choice(list(doc)), None)  # a required field missing
        elif choice < 0.8:
            depth = rng.choice([100, 1000, 100_000])
            if depth > 1000:  # built as bytes below: json.dumps does not go that deep
                huge_nest = True
                continue
            nested: object = "deep"
            for _ in range(depth):
                nested = [nested]
            doc = _replace_at(doc, target, nested)
        else:
            doc = _replace_at(doc, target, rng.choice(["x", 1, None]) if target else {})
    try:
        body = json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")
    except RecursionError:
        huge_nest = True
    if huge_nest:  # JSON nested 10^5 deep (it crashed the front with a RecursionError)
        body = b'{"model": "velo", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    if rng.random() < 0.2:  # broken bytes
        data = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        body = bytes(data[: rng.randint(0, len(data))] if rng.random() < 0.3 else data)
    method = "GET" if path in ("/v1/models", "/healthz", "/v1/velo/cache/entries") else "POST"
    if rng.random() < 0.05:
        method = rng.choice(["PUT", "PATCH", "DELETE", "GET", "POST"])
    return method, path, headers, body


async def fuzz_http(base_url: str, requests: int = 10_000, seed: int = 0,
                    concurrency: int = 16) -> HttpFuzzReport:
    """Send `requests` mutated HTTP requests to the edge's HTTP front at `base_url`
    (http://host:port), `concurrency` at a time; then check it still answers."""
    import httpx

    rng = random.Random(seed)
    jobs = iter([http_request(rng) for _ in range(requests)])
    report = HttpFuzzReport()
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, timeout=RPC_TIMEOUT_S * 3) as client:
        async def worker() -> None:
            for method, path, headers, body in jobs:
                report.requests += 1
                raw = {k: v.encode("utf-8") for k, v in headers.items()}  # any bytes, as sent
                try:
                    reply = await client.request(method, path, headers=raw, content=body)
                    status, text = reply.status_code, reply.text[:300]
                except httpx.LocalProtocolError:  # h11 would not send it: no request made
                    report.requests -= 1
                    report.unsendable += 1
                    continue
                except httpx.HTTPError as exc:  # a dropped connection or a hang
                    status, text = 0, f"{type(exc).__name__}: {exc}"
                report.statuses[status] = report.statuses.get(status, 0) + 1
                if status == 0 or (status >= 500 and status != 503):
                    report.server_errors += 1
                    if len(report.surprises) < MAX_SURPRISES:
                        report.surprises.append((status, text, body[:500].decode(
                            "utf-8", "replace")))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        report.seconds = time.monotonic() - started
        try:
            health = await client.get("/healthz")
            models = await client.get("/v1/models")
            report.alive = health.status_code in (200, 503) and models.status_code == 200
        except httpx.HTTPError:
            report.alive = False
    return report


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
                           visible_timeout_s: float = 60.0, http_url: str = "",
                           history_share: float = 0.3) -> IsolationReport:
    """Seed the edge's collection through `cache` (a client of its own, as another process
    would be) so that every tenant holds the same questions with its own answers, wait until
    the edge serves them, then send `probes` Asks as random tenants and judge every answer.
    With `http_url` (the edge's HTTP front, auth off: `x-velo-tenant` names the tenant) half
    of the probes go over HTTP; `history_share` of them carry an earlier exchange.

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
    import httpx

    judge = _Judge(IsolationReport(), seeded)
    async with grpc.aio.insecure_channel(address) as channel, \
            httpx.AsyncClient(base_url=http_url or "http://unused",
                              timeout=RPC_TIMEOUT_S) as http:
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

        plan = iter([(rng.choice(names), _probe_text(rng, asked),
                      bool(http_url) and rng.random() < 0.5,
                      _history(rng, asked) if rng.random() < history_share else [])
                     for _ in range(probes)])

        async def worker() -> None:
            for tenant, prompt, over_http, history in plan:
                if over_http:
                    await judge.ask_http(http, tenant, prompt, history)
                else:
                    await judge.ask(stub, tenant, prompt, history=history)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        judge.report.seconds = time.monotonic() - started
    return judge.report


def _history(rng: random.Random, asked: list[str]) -> list[tuple[str, str]]:
    """An earlier exchange: (role, content) turns before the prompt."""
    return [("user", rng.choice(asked)), ("assistant", "An earlier answer.")]


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

    def _count(self, warmup: bool, kind: str) -> None:
        if warmup:
            self.report.warmup += 1
        else:
            self.report.probes += 1
            self.report.kinds[kind] = self.report.kinds.get(kind, 0) + 1

    def _code(self, code: str) -> None:
        self.report.codes[code] = self.report.codes.get(code, 0) + 1

    async def ask(self, stub: edge_pb2_grpc.EdgeServiceStub, tenant: str, prompt: str,
                  warmup: bool = False, history: list[tuple[str, str]] | None = None,
                  ) -> edge_pb2.AskResponse | None:
        self._count(warmup, "grpc+history" if history else "grpc")
        turns = [ChatMessage(role=role, content=text) for role, text in history or []]
        try:
            reply = await stub.Ask(edge_pb2.AskRequest(prompt=prompt, tenant=tenant,
                                                       history=turns), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            self._code(exc.code().name)
            return None
        self._code("OK")
        letter = {edge_pb2.ACTION_REUSE: "A", edge_pb2.ACTION_FORWARD: "B",
                  edge_pb2.ACTION_AUGMENT: "C"}.get(reply.action, "?")
        self._judge(tenant, prompt, letter, reply.answer)
        return reply

    async def ask_http(self, client: httpx.AsyncClient, tenant: str, prompt: str,
                       history: list[tuple[str, str]]) -> None:
        """The same probe through the OpenAI-compatible front; the action is the `velo`
        field's."""
        import httpx

        self._count(False, "http+history" if history else "http")
        messages = [{"role": r, "content": t} for r, t in history]
        messages.append({"role": "user", "content": prompt})
        try:
            reply = await client.post("/v1/chat/completions", headers={"x-velo-tenant": tenant},
                                      json={"model": "velo", "messages": messages})
        except httpx.HTTPError as exc:
            self._code(f"HTTP {type(exc).__name__}")
            return
        if reply.status_code != 200:
            self._code(f"HTTP {reply.status_code}")
            return
        self._code("OK")
        body = reply.json()
        letter = {"reuse": "A", "forward": "B", "augment": "C"}.get(body["velo"]["action"], "?")
        self._judge(tenant, prompt, letter, body["choices"][0]["message"]["content"])

    def _judge(self, tenant: str, prompt: str, letter: str, answer: str) -> None:
        report = self.report
        report.actions[letter] = report.actions.get(letter, 0) + 1
        if letter != "A":
            self.learned[tenant].add(answer)
            return
        report.served += 1
        owner = self.owner.get(answer)
        if owner == tenant or (owner is None and answer in self.learned[tenant]):
            return
        if owner is None:
            report.unexplained += 1
        else:
            report.across_tenants += 1
            if len(report.leaks) < MAX_SURPRISES:
                report.leaks.append(Leak(tenant, prompt, answer, owner))
