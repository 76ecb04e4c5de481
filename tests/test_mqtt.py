"""MQTT fleet broadcast against a real Mosquitto on loopback, a real trainerd over gRPC and the
edge's real PolicyFollower (no Milvus: the follower needs only trainerd).

Where a test must show that MQTT (and not the gRPC watch stream) delivered a version, the
edge's follower runs without its watch: then the announcement listener is the only code that
ever asks trainerd for a policy. The last test starts a whole edged (with the session's
Milvus) to check that edged wires the listener in.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt
import grpc
import pytest

from edged.announcements import AnnouncementListener
from edged.config import EdgeConfig
from edged.server import Edged
from edged.trainer_link import PolicyFollower
from tests.conftest import running
from tests.test_trainerd import running as running_trainer
from trainerd.config import TrainerConfig
from trainerd.export import export_mlp_policy
from trainerd.server import Trainerd
from velo.core.policy import RandomPolicy
from velo.runtime import fleet
from velo.runtime.config import ConfigError, load_config
from velo.v1 import trainer_pb2, trainer_pb2_grpc

TOP_P, EMBED_DIM = 5, 384
MiB = 1024 * 1024


def _mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found is None and os.access("/usr/sbin/mosquitto", os.X_OK):
        found = "/usr/sbin/mosquitto"  # Debian puts it in sbin, off a normal user's PATH
    return found


MOSQUITTO = _mosquitto()
NO_BROKER = "mosquitto is not installed (Debian: apt-get install mosquitto; .ci/run does it)"


class Broker:
    """A real Mosquitto on a free loopback port, persisting retained messages in `root`;
    stop() and start() again keep the port (clients reconnect to the same address)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.conf = root / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {root}/\n"
            # Started as root, mosquitto would switch to the `mosquitto` user, which cannot
            # write here; as any other user this line is ignored.
            f"user {getpass.getuser()}\n"
            f"log_dest file {root}/mosquitto.log\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                pytest.fail(f"mosquitto exited with {self.proc.returncode}: {err}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.05)
        pytest.fail(f"mosquitto did not listen on {self.address} within 10 s")

    def stop(self) -> None:
        """SIGTERM: mosquitto writes its persistence file (retained messages) and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path):
    if MOSQUITTO is None:
        pytest.skip(NO_BROKER)  # only the tests that need a broker: the rest still run
    root = tmp_path / "broker"
    root.mkdir()
    b = Broker(root)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def policies() -> list[bytes]:
    """Three different valid policies (different sha256), to publish as v1, v2, v3."""
    return [export_mlp_policy(None, top_p=TOP_P, embed_dim=EMBED_DIM, seed=s) for s in range(3)]


def mqtt_config(broker: Broker, **overrides: object) -> fleet.MqttConfig:
    # Short back-off so that a reconnection after a broker restart takes about a second.
    return fleet.MqttConfig(broker=broker.address, max_backoff_s=1.0,
                            **overrides)  # type: ignore[arg-type]


def trainerd(data_dir: Path, mqtt: fleet.MqttConfig | None,
             ) -> contextlib.AbstractAsyncContextManager[
                 tuple[Trainerd, trainer_pb2_grpc.TrainerServiceStub]]:
    return running_trainer(data_dir, mqtt=mqtt or fleet.MqttConfig())


@contextlib.asynccontextmanager
async def edge(trainer: Trainerd, store_dir: Path, mqtt: fleet.MqttConfig, *, watch: bool,
               edge_id: str = "edge-1",
               ) -> AsyncIterator[tuple[PolicyFollower, AnnouncementListener]]:
    """The edge's policy side as edged wires it: a PolicyFollower on a channel to trainerd and
    an AnnouncementListener feeding it; the follower's gRPC watch runs only if `watch`."""
    async with grpc.aio.insecure_channel(trainer.grpc.address) as channel:
        follower = PolicyFollower(channel, RandomPolicy(), store_dir, top_p=TOP_P,
                                  embed_dim=EMBED_DIM, sample=False, seed=0, max_bytes=8 * MiB)
        listener = AnnouncementListener(mqtt, follower, edge_id)
        tasks = [asyncio.create_task(listener.run())]
        if watch:
            tasks.append(asyncio.create_task(follower.run()))
        try:
            yield follower, listener
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def first_message(mqtt: fleet.MqttConfig, timeout: float = 10.0) -> aiomqtt.Message:
    """Subscribe now (a late subscriber) and return the first message on the policy topic."""
    async with fleet.client(mqtt, "test-subscriber") as client:
        await client.subscribe(mqtt.topic, qos=fleet.QOS)
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                return message
    raise AssertionError("unreachable")


async def publish(stub: trainer_pb2_grpc.TrainerServiceStub, body: bytes) -> int:
    info = await stub.PublishPolicy(trainer_pb2.PublishPolicyRequest(name="mlp", onnx=body))
    return info.version


def announced(body: bytes, version: int) -> fleet.Announcement:
    return fleet.Announcement(version, hashlib.sha256(body).hexdigest(), len(body))


# -- the shared contract (no broker needed, but kept beside the rest) ------------------------


def test_announcement_round_trip_and_refusals() -> None:
    a = fleet.Announcement(7, "ab" * 32, 1234)
    assert fleet.decode(fleet.encode(a)) == a
    # A newer trainerd may add keys; older edges ignore them.
    assert fleet.decode(b'{"version": 7, "sha256": "' + b"ab" * 32
                        + b'", "size_bytes": 1234, "name": "x"}') == a
    bad = {
        b"not json": "JSON",
        b"[1, 2]": "object",
        b'{"version": true, "sha256": "' + b"ab" * 32 + b'", "size_bytes": 1}': "version",
        b'{"version": 0, "sha256": "' + b"ab" * 32 + b'", "size_bytes": 1}': "version",
        b'{"version": 1, "sha256": "' + b"AB" * 32 + b'", "size_bytes": 1}': "sha256",
        b'{"version": 1, "sha256": "abc", "size_bytes": 1}': "sha256",
        b'{"version": 1, "sha256": "' + b"ab" * 32 + b'"}': "size_bytes",
        b" " * (fleet.MAX_PAYLOAD_BYTES + 1): "bytes",
    }
    for payload, named in bad.items():
        with pytest.raises(fleet.BadAnnouncement, match=named):
            fleet.decode(payload)


def test_mqtt_config_is_off_by_default_and_checked(tmp_path: Path) -> None:
    assert not TrainerConfig().mqtt.enabled and not EdgeConfig().mqtt.enabled
    assert fleet.MqttConfig(topic_prefix="fleet-a/velo").topic == "fleet-a/velo/latest"
    conf = tmp_path / "trainerd.toml"
    for section, key in (('broker = "mqtt.example"', "mqtt.broker"),  # no port
                         ('broker = "h:1883"\ntopic_prefix = "velo/#"', "mqtt.topic_prefix"),
                         ('broker = "h:1883"\npassword_file = "/nonexistent"',
                          "mqtt.password_file")):
        conf.write_text(f"[mqtt]\n{section}\n")
        with pytest.raises(ConfigError, match=key):
            load_config(TrainerConfig, conf, "VELO_TRAINERD_TEST")
    # An edge pulls announced versions from trainerd: MQTT without a trainer is refused.
    conf.write_text('trainer = ""\n[mqtt]\nbroker = "127.0.0.1:1883"\n')
    with pytest.raises(ConfigError, match=r"'mqtt'.*needs trainer"):
        load_config(EdgeConfig, conf, "VELO_EDGED_TEST")


# -- (a) trainerd announces, retained ---------------------------------------------------------


async def test_trainerd_announces_each_version_retained(
        tmp_path: Path, broker: Broker, policies: list[bytes]) -> None:
    mqtt = mqtt_config(broker, topic_prefix="test/a")
    async with trainerd(tmp_path / "trainer", mqtt) as (daemon, stub):
        assert await publish(stub, policies[0]) == 1
        await wait_until(lambda: daemon.broadcaster.announced == 1, "v1 announced")
        # Subscribed after the publish: the broker hands over the retained announcement.
        message = await first_message(mqtt)
        assert message.retain and message.qos == fleet.QOS
        assert message.topic.value == "test/a/latest"
        assert fleet.decode(message.payload) == announced(policies[0], 1)

        assert await publish(stub, policies[1]) == 2
        await wait_until(lambda: daemon.broadcaster.announced == 2, "v2 announced")
        assert fleet.decode((await first_message(mqtt)).payload) == announced(policies[1], 2)

    # trainerd is gone and the broker restarts: the retained announcement was persisted.
    broker.stop()
    broker.start()
    message = await first_message(mqtt)
    assert message.retain and fleet.decode(message.payload) == announced(policies[1], 2)


# -- (b) an edge learns a version through MQTT ------------------------------------------------


async def test_edge_pulls_announced_version_without_the_watch(
        tmp_path: Path, broker: Broker, policies: list[bytes]) -> None:
    mqtt = mqtt_config(broker, topic_prefix="test/b")
    async with (trainerd(tmp_path / "trainer", mqtt) as (daemon, stub),
                edge(daemon, tmp_path / "edge", mqtt, watch=False) as (follower, listener)):
        for version, body in enumerate(policies[:2], start=1):
            assert await publish(stub, body) == version
            await wait_until(lambda v=version: follower.current.version == v,
                             f"the edge to run v{version} (announced over MQTT)")
            assert follower.current.sha256 == hashlib.sha256(body).hexdigest()
        assert listener.last_announced == 2 and not follower.rejected
        # The pulled policy was saved as the edge's last verified one, as the watch saves it.
        assert (tmp_path / "edge" / "current.onnx").read_bytes() == policies[1]


async def test_edge_runs_only_what_matches_the_announcement(
        tmp_path: Path, broker: Broker, policies: list[bytes]) -> None:
    """Anyone who may publish on the broker can send announcements: the edge pulls the named
    version from trainerd and runs it only if it has the announced sha256 and size."""
    # trainerd without MQTT: the only announcements are the ones this test sends.
    mqtt = mqtt_config(broker, topic_prefix="test/forged")
    async with (trainerd(tmp_path / "trainer", None) as (daemon, stub),
                edge(daemon, tmp_path / "edge", mqtt, watch=False) as (follower, listener)):
        assert await publish(stub, policies[0]) == 1
        real = announced(policies[0], 1)
        forged = [
            b"{not json",
            fleet.encode(fleet.Announcement(1, "0" * 64, real.size_bytes)),  # other sha256
            fleet.encode(fleet.Announcement(1, real.sha256, real.size_bytes + 1)),  # other size
            fleet.encode(fleet.Announcement(5, real.sha256, real.size_bytes)),  # not published
        ]
        # Not retained (each would replace the one before): the listener must be there first.
        await wait_until(lambda: listener.subscribed, "the listener to subscribe")
        async with fleet.client(mqtt, "test-forger") as forger:
            for payload in forged:
                await forger.publish(mqtt.topic, payload, qos=fleet.QOS)
            await wait_until(lambda: listener.received + listener.invalid == len(forged),
                             "the listener to handle every forged message")
            assert listener.invalid == 1
            assert follower.current.version == 0  # still the baseline
            # A forged announcement does not blacklist the real policy.
            assert not follower.rejected
            await forger.publish(mqtt.topic, fleet.encode(real), qos=fleet.QOS)
            await wait_until(lambda: follower.current.version == 1, "the real announcement")
        assert follower.current.sha256 == real.sha256


# -- (c) broker restart while everything runs -------------------------------------------------


async def test_broker_restart_gRPC_carries_on_and_mqtt_reconnects(
        tmp_path: Path, broker: Broker, policies: list[bytes]) -> None:
    mqtt = mqtt_config(broker, topic_prefix="test/c")
    async with (trainerd(tmp_path / "trainer", mqtt) as (daemon, stub),
                # As edged runs it: the gRPC watch and MQTT side by side.
                edge(daemon, tmp_path / "full", mqtt, watch=True, edge_id="full") as (
                    full, full_mqtt),
                # MQTT alone: whatever it runs came through the broker.
                edge(daemon, tmp_path / "only", mqtt, watch=False, edge_id="only") as (
                    only, only_mqtt)):
        assert await publish(stub, policies[0]) == 1
        await wait_until(lambda: full.current.version == 1 and only.current.version == 1,
                         "both edges to run v1")

        broker.stop()
        assert await publish(stub, policies[1]) == 2
        # The broker is down: the watch stream still brings v2 to the full edge...
        await wait_until(lambda: full.current.version == 2, "the watch to deliver v2")
        # ... and nothing reached the MQTT-only edge (trainerd may notice the broker's absence
        # only now, on its failed announcement of v2).
        await asyncio.sleep(1.0)
        assert only.current.version == 1 and daemon.broadcaster.announced == 1

        broker.start()
        # trainerd reconnects and announces its latest version again; the MQTT-only edge
        # reconnects, resubscribes and pulls it.
        await wait_until(lambda: only.current.version == 2, "MQTT to deliver v2 after restart")
        assert daemon.broadcaster.announced == 2

        assert await publish(stub, policies[2]) == 3
        await wait_until(lambda: only.current.version == 3 and full.current.version == 3,
                         "both edges to run v3")
        # The full edge's MQTT side reconnected too (it saw v3 announced).
        await wait_until(lambda: full_mqtt.last_announced == 3, "the full edge's listener")
        assert only_mqtt.last_announced == 3
        assert only.current.sha256 == hashlib.sha256(policies[2]).hexdigest()
        assert not full.rejected and not only.rejected


# -- edged wires it in (needs Milvus: run under `flock /tmp/velo-milvus.lock`) -----------------


async def test_edged_starts_and_stops_its_listener(
        tmp_path: Path, broker: Broker, policies: list[bytes], edge_config) -> None:
    mqtt = mqtt_config(broker, topic_prefix="test/edged")
    async with trainerd(tmp_path / "trainer", mqtt) as (daemon, stub):
        cfg = edge_config(trainer=daemon.grpc.address, mqtt=mqtt)
        async with running(Edged(cfg)) as edged:
            listener = edged.announcements
            assert listener.client_id == f"velo-edged-{cfg.edge_id}"
            await wait_until(lambda: listener.subscribed, "edged's listener to subscribe")
            assert await publish(stub, policies[0]) == 1
            await wait_until(lambda: edged.policies.current.version == 1
                             and listener.last_announced == 1, "edged to run the announced v1")
        # Shutdown cancelled the listener with the other background tasks.
        assert not listener.subscribed
