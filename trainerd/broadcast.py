"""trainerd's side of the MQTT fleet broadcast (velo.runtime.fleet): announce each accepted policy.

Each version the registry accepts is published, retained and at QoS 1, to the fleet's policy
topic. On every (re)connection the latest version is published again first: a version
accepted while the broker was down is announced as soon as it is back, and the retained
message always names the latest version even if the broker lost its state.
"""

from __future__ import annotations

import aiomqtt

from trainerd.registry import PolicyInfo, PolicyRegistry
from velo.runtime import fleet
from velo.runtime.logs import get_logger

log = get_logger("trainerd.mqtt")
CLIENT_ID = "velo-trainerd"


class PolicyBroadcaster:
    def __init__(self, cfg: fleet.MqttConfig, registry: PolicyRegistry) -> None:
        self.cfg, self.registry = cfg, registry
        self.announced = 0  # the last version the broker acknowledged (0: none yet)

    async def run(self) -> None:
        """Announce until cancelled (or the registry closes), reconnecting as needed."""
        await fleet.stay_connected(self.cfg, CLIENT_ID, self._session, log)

    async def _session(self, client: aiomqtt.Client) -> None:
        latest = self.registry.latest()
        after = 0
        if latest is not None:
            await self._announce(client, latest)
            after = latest.version
        while True:
            # None once trainerd stops. A broker that went away in the meantime shows up as
            # an MqttError from the next publish, and stay_connected reconnects.
            info = await self.registry.wait_newer(after)
            if info is None:
                return
            await self._announce(client, info)
            after = info.version

    async def _announce(self, client: aiomqtt.Client, info: PolicyInfo) -> None:
        payload = fleet.encode(fleet.Announcement(info.version, info.sha256, info.size_bytes))
        # QoS 1: returns once the broker has acknowledged (and so retained) it.
        await client.publish(self.cfg.topic, payload, qos=fleet.QOS, retain=True)
        self.announced = info.version
        log.info("policy announced", version=info.version, topic=self.cfg.topic)
