"""The OpenAI-compatible HTTP front of edged, driven by the real `openai` client (sync, async,
streaming) and by curl, against a real edge (Milvus, the ONNX embedder, a real cloudd in front
of the fake LLM server)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from edged.config import EdgeAuthConfig, HttpConfig, PolicyConfig
from edged.server import Edged
from tests.conftest import running
from tests.fake_llm import fake_tokens
from tests.test_security import tokens_file
from velo.runtime.security import new_token

QUESTION = "How do I reset my router to factory settings?"
PARAPHRASE = "How can I reset my router to its factory settings?"
LLM_ANSWER = "".join(fake_tokens(8))


def front_config(edge_config, cloud: str, **overrides: object) -> object:
    return edge_config(cloud=cloud, http=HttpConfig(listen="127.0.0.1:0"),
                       policy=PolicyConfig(shadow_rate=0), **overrides)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


async def test_the_sync_client_is_served_and_told_how(edge_config, cloud) -> None:
    async with running(Edged(front_config(edge_config, cloud))) as edge:
        client = openai.OpenAI(base_url=f"{edge.http.url}/v1", api_key="unused")

        def create(prompt: str) -> object:
            return client.chat.completions.with_raw_response.create(
                model="velo", messages=[user(prompt)])

        first = await asyncio.to_thread(create, QUESTION)
        completion = first.parse()
        assert completion.choices[0].message.content == LLM_ANSWER
        assert first.headers["x-velo-action"] == "forward"
        assert "x-velo-entry-id" not in first.headers
        assert completion.model_extra["velo"]["stored"] is True

        second = await asyncio.to_thread(create, PARAPHRASE)
        reused = second.parse()
        velo = reused.model_extra["velo"]
        assert reused.choices[0].message.content == LLM_ANSWER
        assert second.headers["x-velo-action"] == velo["action"] == "reuse"
        assert float(second.headers["x-velo-similarity"]) == pytest.approx(velo["similarity"])
        assert 0.9 < velo["similarity"] < 1.0 and velo["cached_question"] == QUESTION
        assert second.headers["x-velo-entry-id"] == velo["entry_id"] != "0"
        assert second.headers["x-velo-policy"] == velo["policy"] == "cache-0.5"
        assert second.headers["x-velo-policy-version"] == "0"
        assert int(second.headers["age"]) >= 0
        models = await asyncio.to_thread(client.models.list)
        assert [m.id for m in models.data] == ["velo"]
        client.close()


async def test_async_streams_are_cached_once_complete_and_reuses_replay(edge_config,
                                                                         cloud) -> None:
    async with running(Edged(front_config(edge_config, cloud))) as edge:
        client = openai.AsyncOpenAI(base_url=f"{edge.http.url}/v1", api_key="unused")

        async def stream(prompt: str) -> tuple[str, list, dict]:
            async with client.chat.completions.with_streaming_response.create(
                    model="velo", messages=[user(prompt)], stream=True) as response:
                headers = dict(response.headers)
                chunks = [c async for c in await response.parse()]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            return text, chunks, headers

        text, chunks, headers = await stream(QUESTION)
        assert text == LLM_ANSWER and headers["x-velo-action"] == "forward"
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert chunks[-1].model_extra["velo"]["stored"] is True

        text, chunks, headers = await stream(PARAPHRASE)
        assert text == LLM_ANSWER and headers["x-velo-action"] == "reuse"
        pieces = [c for c in chunks if c.choices[0].delta.content]
        assert len(pieces) > 1  # replayed as a stream, not one blob
        assert chunks[-1].model_extra["velo"]["entry_id"] == headers["x-velo-entry-id"]

        plain = await client.chat.completions.create(model="velo", messages=[user(PARAPHRASE)])
        assert plain.choices[0].message.content == LLM_ANSWER
        await client.close()


async def test_history_cache_control_and_errors(edge_config, cloud) -> None:
    async with running(Edged(front_config(edge_config, cloud))) as edge:
        client = openai.AsyncOpenAI(base_url=f"{edge.http.url}/v1", api_key="unused",
                                    max_retries=0)

        async def action(messages: list[dict], **kw: object) -> str:
            raw = await client.chat.completions.with_raw_response.create(
                model="velo", messages=messages, **kw)
            return raw.headers["x-velo-action"]

        french = [{"role": "system", "content": "Answer in French."}, user(QUESTION)]
        pirate = [{"role": "system", "content": "Answer like a pirate."}, user(QUESTION)]
        assert await action(french) == "forward"
        assert await action(french) == "reuse"
        assert await action(pirate) == "forward"  # another conversation: another cache key

        assert await action(french, extra_body={"velo": {"cache": {"no_cache": True}}}) \
            == "forward"
        assert await action(french, extra_headers={"Cache-Control": "max-age=0"}) == "forward"
        assert await action(french, extra_headers={"x-velo-min-similarity": "0.5"}) == "reuse"
        new = [user("What is the tallest mountain in Wales?")]
        assert await action(new, extra_headers={"Cache-Control": "no-store"}) == "forward"
        assert await action(new) == "forward"  # the first answer was not stored

        with pytest.raises(openai.BadRequestError, match="last message must be the user"):
            await client.chat.completions.create(
                model="velo", messages=[user("hi"), {"role": "assistant", "content": "Hello"}])
        with pytest.raises(openai.BadRequestError, match="min_similarity"):
            await client.chat.completions.create(
                model="velo", messages=[user("hi")],
                extra_body={"velo": {"cache": {"min_similarity": 2}}})
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            await client.chat.completions.create(model="velo", messages=[user("hi")],
                                                 max_tokens=10**6)
        async with httpx.AsyncClient() as http:
            health = await http.get(f"{edge.http.url}/healthz")
            assert health.status_code == 200 and health.json()["status"] == "SERVING"
        await client.close()


async def test_api_keys_name_the_tenant(edge_config, cloud, tmp_path: Path) -> None:
    acme, globex, admin = new_token(), new_token(), new_token()
    auth = EdgeAuthConfig(tokens_file=tokens_file(tmp_path / "users.toml", [
        (acme, "tenant", "acme"), (globex, "tenant", "globex"), (admin, "admin", "ops")]))
    async with running(Edged(front_config(edge_config, cloud, auth=auth))) as edge:
        def client(key: str) -> openai.AsyncOpenAI:
            return openai.AsyncOpenAI(base_url=f"{edge.http.url}/v1", api_key=key,
                                      max_retries=0)

        async def action(key: str) -> str:
            raw = await client(key).chat.completions.with_raw_response.create(
                model="velo", messages=[user(QUESTION)])
            return raw.headers["x-velo-action"]

        assert await action(acme) == "forward"
        assert await action(acme) == "reuse"
        assert await action(globex) == "forward"  # acme's answer is not globex's
        with pytest.raises(openai.AuthenticationError, match="not a known API key"):
            await action("velo_wrong")
        with pytest.raises(openai.PermissionDeniedError, match="role 'admin'"):
            await action(admin)
        with pytest.raises(openai.PermissionDeniedError, match="another tenant"):
            await client(acme).chat.completions.create(
                model="velo", messages=[user(QUESTION)], extra_headers={"x-velo-tenant": "globex"})
        assert [m.id for m in (await client(admin).models.list()).data] == ["velo"]


async def test_curl_gets_json_and_server_sent_events(edge_config, cloud) -> None:
    async with running(Edged(front_config(edge_config, cloud))) as edge:
        url = f"{edge.http.url}/v1/chat/completions"

        async def curl(*args: str) -> str:
            done = await asyncio.to_thread(
                subprocess.run, ["curl", "-sS", "-i", "-N", url, "-H",
                                 "Content-Type: application/json", *args],
                capture_output=True, text=True, timeout=60, check=True)  # text: \r\n -> \n
            return done.stdout

        body = {"model": "velo", "messages": [user(QUESTION)]}
        plain = await curl("-d", json.dumps(body))
        head, _, payload = plain.partition("\n\n")
        assert head.startswith("HTTP/1.1 200") and "x-velo-action: forward" in head
        assert json.loads(payload)["choices"][0]["message"]["content"] == LLM_ANSWER

        streamed = await curl("-d", json.dumps(body | {"stream": True}))
        head, _, events = streamed.partition("\n\n")
        assert "x-velo-action: reuse" in head and "text/event-stream" in head
        data = [line[len("data: "):] for line in events.splitlines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == LLM_ANSWER

        bad = await curl("-d", "{not json")
        head, _, payload = bad.partition("\n\n")
        assert head.startswith("HTTP/1.1 400")
        assert "not JSON" in json.loads(payload)["error"]["message"]


async def test_a_stream_the_cloud_cannot_answer_is_an_http_error_not_a_broken_stream(
        edge_config) -> None:
    """The cloud is down (nothing listens at its address): a streamed forward gets HTTP 503
    with an OpenAI error body before any event, as a plain request does (it got 200, then an
    error event and no [DONE])."""
    from velo.ops.ports import free_port

    cfg = front_config(edge_config, f"127.0.0.1:{free_port()}")
    async with running(Edged(cfg)) as edge, httpx.AsyncClient(timeout=60) as http:
        for stream in (True, False):
            reply = await http.post(f"{edge.http.url}/v1/chat/completions", json={
                "model": "velo", "stream": stream,
                "messages": [user("Is anyone answering in the cloud?")]})
            assert reply.status_code == 503, (stream, reply.text[:300])
            assert reply.headers["content-type"].startswith("application/json")
            assert "cloud" in reply.json()["error"]["message"]


async def test_with_auth_on_healthz_tells_why_only_to_an_admin(edge_config,
                                                               tmp_path: Path) -> None:
    """/healthz stays open to load balancers, but with [auth] on the reasons (internal
    addresses, exception text) go only to an admin key (they went to anyone)."""
    from velo.ops.ports import free_port

    tenant, admin = new_token(), new_token()
    auth = EdgeAuthConfig(tokens_file=tokens_file(tmp_path / "users.toml", [
        (tenant, "tenant", "acme"), (admin, "admin", "ops")]))
    dead = f"127.0.0.1:{free_port()}"
    async with running(Edged(front_config(edge_config, dead, auth=auth))) as edge, \
            httpx.AsyncClient(timeout=30) as http:
        for key in ("", tenant):
            anyone = await http.get(f"{edge.http.url}/healthz",
                                    headers={"authorization": f"Bearer {key}"} if key else {})
            assert anyone.status_code == 503 and anyone.json()["down"] == {"cloud": "down"}
            assert dead not in anyone.text
        admin_view = await http.get(f"{edge.http.url}/healthz",
                                    headers={"authorization": f"Bearer {admin}"})
        assert admin_view.status_code == 503 and dead in admin_view.json()["down"]["cloud"]


async def test_slow_clients_are_cut_off_and_capped(edge_config, cloud) -> None:
    """Half-open connections (headers never finished): beyond http.max_connections the oldest
    are closed, the rest when http.header_timeout_s runs out; gRPC answers meanwhile, and so
    does HTTP, at once (uvicorn alone kept every one open: slow-loris took the edge's file
    descriptors; a plain cap then locked real clients out until the header timeout)."""
    import socket

    from edged.config import HttpConfig as Http
    from tests.conftest import ask, edge_client

    cfg = edge_config(cloud=cloud, http=Http(listen="127.0.0.1:0", header_timeout_s=4.0,
                                             max_connections=20),
                      policy=PolicyConfig(shadow_rate=0))
    async with running(Edged(cfg)) as edge:
        host, port = edge.http.address.rsplit(":", 1)
        slow = []
        for _ in range(100):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\n")  # never ends
            slow.append(sock)
        await asyncio.sleep(0.3)

        def closed_by_server(sock: socket.socket) -> bool:
            sock.settimeout(0.05)
            try:
                return sock.recv(1) == b""
            except TimeoutError:
                return False
            except OSError:
                return True

        assert sum(map(closed_by_server, slow[:80])) == 80  # over the cap: the oldest went
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=30) as http:
            reply = await http.post(f"{edge.http.url}/v1/chat/completions", json={
                "model": "velo", "messages": [user("Is HTTP answering under the flood?")]})
        assert reply.status_code == 200 and time.monotonic() - started < 3.0
        async with edge_client(edge.grpc.address) as stub:
            assert (await stub.Ask(ask("Is gRPC still answering?"), timeout=30)).answer
        await asyncio.sleep(4.5)
        assert all(map(closed_by_server, slow))  # the rest: their headers were too late
        for sock in slow:
            sock.close()


async def test_hostile_bodies_get_400_never_500(edge_config, cloud) -> None:
    """The three bodies that got a 500 and a traceback in the round-2 probe: a role that is no
    string, a lone surrogate (valid JSON, no text), and JSON nested 10⁵ deep."""
    async with running(Edged(front_config(edge_config, cloud))) as edge, \
            httpx.AsyncClient(timeout=30) as http:
        url = f"{edge.http.url}/v1/chat/completions"
        bodies = [
            json.dumps({"model": "velo", "messages": [{"role": {"user": 1}, "content": "hi"}]}),
            json.dumps({"model": "velo", "messages": [{"role": ["user"], "content": "hi"}]}),
            '{"model": "velo", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
            '{"model": "velo", "messages": [{"role": "user", "content": "x"}], "velo": '
            + "[" * 100_000 + "]" * 100_000 + "}",
        ]
        for body in bodies:
            reply = await http.post(url, content=body.encode(),
                                    headers={"content-type": "application/json"})
            assert reply.status_code == 400, (body[:80], reply.text[:200])
            assert reply.json()["error"]["type"] == "invalid_request_error"
