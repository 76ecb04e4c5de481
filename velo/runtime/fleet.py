"""Fleet broadcast over MQTT: what trainerd and every edge must agree on.

trainerd announces each policy version it accepts on one topic, retained and at QoS 1, so an
edge that subscribes later (or reconnects after a broker restart) still learns the latest
version at once. The announcement only says *which* version exists; an edge pulls the weights
over gRPC (GetPolicy) and checks them against the announced sha256 and size, so the broker is
never trusted with what an edge runs. MQTT only makes edges learn sooner: the gRPC watch
stream keeps working without it.

    [mqtt]
    broker = "mqtt.example.net:8883"   empty (the default): off
    topic_prefix = "velo/policy"       announcements go to "<prefix>/latest"
    ca_file = "/etc/velo/tls/ca.pem"   set: TLS, the broker's certificate checked against it

Payload (UTF-8 JSON): {"version": 7, "sha256": "<64 hex>", "size_bytes": 123456}.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiomqtt
import structlog

from velo.runtime.config import is_file, require
from velo.runtime.security import read_token

QOS = 1  # at least once: an edge may see an announcement twice, and ignores the repeat
MAX_PAYLOAD_BYTES = 1024  # an announcement is ~120 bytes; anything bigger is not one
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOPIC_PREFIX = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")  # no wildcards, no empty level


@dataclass
class MqttConfig:
    # MQTT broker as HOST:PORT (e.g. "127.0.0.1:1883", "[::1]:1883"). Empty: no MQTT; edges
    # then learn new policies from trainerd's gRPC watch stream alone.
    broker: str = ""
    # Announcements are published to "<topic_prefix>/latest"; trainerd and its edges must use
    # the same prefix (one prefix per fleet when fleets share a broker).
    topic_prefix: str = "velo/policy"
    # MQTT client id; empty: "velo-trainerd" or "velo-edged-<edge_id>". The broker drops the
    # older of two connections with the same id, so it must be unique per daemon.
    client_id: str = ""
    username: str = ""  # empty: connect anonymously
    password_file: str = ""  # the password, one line in a file (not in the config itself)
    # CA bundle (PEM) the broker's certificate must chain to. Set: the connection uses TLS.
    ca_file: str = ""
    keepalive_s: int = 30  # a silently dead connection is noticed within ~1.5x this
    # Reconnection back-off grows from 0.5 s up to this while the broker is unreachable.
    max_backoff_s: float = 10.0
    # Deadline of each exchange with the broker (connect, subscribe, a QoS 1 publish): a
    # frozen broker counts as unreachable after it, and the client reconnects.
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.broker:
            require(_split_broker(self.broker) is not None, "broker",
                    "must be HOST:PORT with a port 1-65535, e.g. 127.0.0.1:1883")
        require(bool(_TOPIC_PREFIX.fullmatch(self.topic_prefix)), "topic_prefix",
                "must be levels of letters, digits, '_.-' separated by '/', e.g. velo/policy")
        require(len(self.client_id) <= 128, "client_id", "must be at most 128 characters")
        require(not self.password_file or bool(self.username), "password_file",
                "needs username (a password alone is not an MQTT login)")
        for key in ("password_file", "ca_file"):
            path = getattr(self, key)
            require(not path or is_file(path), key, f"{path} is not a readable file")
        require(5 <= self.keepalive_s <= 3600, "keepalive_s", "must be between 5 and 3600")
        require(0.5 <= self.max_backoff_s <= 600, "max_backoff_s", "must be between 0.5 and 600")
        require(0 < self.timeout_s <= 300, "timeout_s", "must be in (0, 300]")

    @property
    def enabled(self) -> bool:
        return bool(self.broker)

    @property
    def topic(self) -> str:
        return policy_topic(self.topic_prefix)


def policy_topic(prefix: str) -> str:
    """The one topic announcements are published to (retained: it holds the latest)."""
    return f"{prefix}/latest"


def _split_broker(broker: str) -> tuple[str, int] | None:
    host, sep, port = broker.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:1883
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


# -- the announcement ------------------------------------------------------------------------


class BadAnnouncement(ValueError):
    """A message on the policy topic is not a valid announcement; the text says why."""


@dataclass(frozen=True)
class Announcement:
    version: int
    sha256: str
    size_bytes: int


def encode(announcement: Announcement) -> bytes:
    return json.dumps({"version": announcement.version, "sha256": announcement.sha256,
                       "size_bytes": announcement.size_bytes}, sort_keys=True).encode()


def decode(payload: bytes) -> Announcement:
    """The announcement in `payload`; BadAnnouncement naming what is wrong. Unknown keys are
    ignored, so that a newer trainerd may add some without breaking older edges."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise BadAnnouncement(f"payload is {len(payload)} bytes; at most {MAX_PAYLOAD_BYTES}")
    try:
        raw = json.loads(payload.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadAnnouncement(f"not UTF-8 JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BadAnnouncement("not a JSON object")
    for key in ("version", "size_bytes"):
        value = raw.get(key)
        # bool is an int in Python; JSON true is not a version.
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**63:
            raise BadAnnouncement(f"{key} must be an integer >= 1, got {value!r:.40}")
    sha256 = raw.get("sha256")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise BadAnnouncement(f"sha256 must be 64 lowercase hex digits, got {sha256!r:.80}")
    return Announcement(raw["version"], sha256, raw["size_bytes"])


# -- staying connected -----------------------------------------------------------------------


def client(cfg: MqttConfig, client_id: str) -> aiomqtt.Client:
    """A (not yet connected) client for `cfg`; `client_id` when cfg.client_id is empty."""
    split = _split_broker(cfg.broker)
    if split is None:
        raise ValueError(f"mqtt broker {cfg.broker!r} is not HOST:PORT")
    host, port = split
    return aiomqtt.Client(
        host, port, identifier=cfg.client_id or client_id,
        username=cfg.username or None,
        password=read_token(cfg.password_file) or None,
        tls_context=ssl.create_default_context(cafile=cfg.ca_file) if cfg.ca_file else None,
        keepalive=cfg.keepalive_s, timeout=cfg.timeout_s,
    )


async def stay_connected(cfg: MqttConfig, client_id: str,
                         session: Callable[[aiomqtt.Client], Awaitable[None]],
                         log: structlog.typing.FilteringBoundLogger) -> None:
    """Run `session` on a connected client, reconnecting with back-off whenever the broker
    goes away, until cancelled. An outage is logged once (not on every retry) and the
    reconnection once more; `session` returning also ends this."""
    loop = asyncio.get_running_loop()
    backoff, down = 0.5, False
    while True:
        since = loop.time()
        try:
            async with client(cfg, client_id) as connected:
                log.info("mqtt reconnected" if down else "mqtt connected", broker=cfg.broker,
                         topic=cfg.topic)
                down = False
                await session(connected)
                return
        except aiomqtt.MqttError as exc:
            if not down:
                log.warning("mqtt broker unreachable; retrying in the background (edges "
                            "still follow policies over gRPC)", broker=cfg.broker,
                            error=str(exc))
                down = True
        except Exception:  # a bug, an unreadable password_file or ca_file: keep retrying
            if not down:
                log.exception("mqtt session failed; retrying", broker=cfg.broker)
                down = True
        # Start over at 0.5 s only after a session that lasted: one that the broker ends at
        # once (e.g. refused by its ACL) backs off like an unreachable broker.
        if loop.time() - since > cfg.max_backoff_s:
            backoff = 0.5
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, cfg.max_backoff_s)
