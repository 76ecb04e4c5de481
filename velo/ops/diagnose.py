"""What is down, in words: asks running daemons for their health and their parts' reasons.

`velo demo` and `velo replay` print this when requests fail, so that "UNAVAILABLE" becomes
"edge-1: cloud down: cloudd at ... is not serving: its LLM is down: ... killed by SIGSEGV".
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from velo.runtime.security import TLSConfig, dial
from velo.v1 import cloud_pb2, cloud_pb2_grpc, edge_pb2, edge_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def _first_line(text: str, limit: int = 240) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "?"
    return line if len(line) <= limit else line[:limit] + "..."


def edge_health(address: str, tls: TLSConfig | None = None, token: str = "",
                timeout_s: float = 3.0) -> str:
    """'serving' or what is down on the edge at `address` and why (the reasons need GetStats,
    an admin's call when the edge has [auth]: with another key only the status is told)."""
    return asyncio.run(_edge_health(address, tls, token, timeout_s))


async def _edge_health(address: str, tls: TLSConfig | None, token: str,
                       timeout_s: float) -> str:
    async with dial(address, tls, token) as channel:
        try:
            status = (await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s)).status
        except grpc.RpcError as exc:
            return f"unreachable ({exc.code().name})"
        try:
            stats = await edge_pb2_grpc.EdgeServiceStub(
                channel).GetStats(edge_pb2.GetStatsRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            state = "serving" if status == SERVING else "not serving"
            return f"{state} (why not told: GetStats answered {exc.code().name})"
    down = [f"{p.name} down: {_first_line(p.reason)}" for p in stats.parts if not p.up]
    if status == SERVING and not down:
        return "serving"
    return ("serving, but " if status == SERVING else "not serving: ") + "; ".join(down or "?")


def cloud_health(address: str, timeout_s: float = 3.0) -> str:
    """'serving' or why cloudd at `address` is not (its LLM's state)."""
    with grpc.insecure_channel(address) as channel:
        try:
            stats = cloud_pb2_grpc.CloudServiceStub(
                channel).GetCloudStats(cloud_pb2.CloudStatsRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"unreachable ({exc.code().name})"
    if stats.llm_up:
        return "serving"
    return f"not serving: LLM down: {_first_line(stats.llm_down_reason)}"


def daemon_health(address: str, timeout_s: float = 3.0) -> str:
    """'serving', 'not serving' or 'unreachable' for any VELO daemon."""
    with grpc.insecure_channel(address) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s).status
        except grpc.RpcError as exc:
            return f"unreachable ({exc.code().name})"
    return "serving" if status == SERVING else "not serving"
