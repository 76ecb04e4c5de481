"""edged's side of the MQTT fleet broadcast (velo.runtime.fleet): learn of new policies at once.

Subscribes to the fleet's policy topic; each announcement of a version newer than the one
running is handed to the PolicyFollower, which pulls that version over gRPC, checks it against
the announced sha256 and size, verifies it and swaps it in. The gRPC watch stream runs beside
this unchanged: with the broker down the edge still follows policies, only through the watch.
"""

from __future__ import annotations

import aiomqtt
import grpc

from edged.trainer_link import PolicyFollower
from velo.runtime import fleet
from velo.runtime.logs import get_logger

log = get_logger("edged.mqtt")


class AnnouncementListener:
    def __init__(self, cfg: fleet.MqttConfig, follower: PolicyFollower, edge_id: str) -> None:
        self.cfg, self.follower = cfg, follower
        self.client_id = f"velo-edged-{edge_id}"
        # What arrived, for GetStats-style inspection and tests.
        self.received = 0  # valid announcements handled (fetched or not), repeats included
        self.invalid = 0  # messages on the topic that were not announcements
        self.last_announced = 0  # highest version announced so far
        self.subscribed = False  # connected and subscribed now

    async def run(self) -> None:
        """Listen until cancelled, reconnecting (and so resubscribing) as needed."""
        await fleet.stay_connected(self.cfg, self.client_id, self._session, log)

    async def _session(self, client: aiomqtt.Client) -> None:
        # The retained announcement arrives right after subscribing: the latest version,
        # also after every reconnection.
        await client.subscribe(self.cfg.topic, qos=fleet.QOS)
        self.subscribed = True
        try:
            async for message in client.messages:  # MqttError when the broker goes away
                await self.handle(message.payload)
        finally:
            self.subscribed = False

    async def handle(self, payload: object) -> None:
        """One message from the policy topic."""
        if not isinstance(payload, bytes | bytearray) or not payload:
            return  # an empty retained message clears the topic; nothing to follow
        try:
            announced = fleet.decode(bytes(payload))
        except fleet.BadAnnouncement as exc:
            self.invalid += 1
            log.warning("ignored a message on the policy topic", topic=self.cfg.topic,
                        error=str(exc))
            return
        self.last_announced = max(self.last_announced, announced.version)
        try:
            if announced.version > self.follower.current.version:  # else a repeat, or the
                await self.follower.follow_announcement(announced)  # watch got there first
        except grpc.aio.AioRpcError as exc:
            # trainerd unreachable: the watch stream retries on its own; keep listening.
            log.warning("announced policy not fetched", version=announced.version,
                        code=exc.code().name, detail=exc.details())
        finally:
            self.received += 1
