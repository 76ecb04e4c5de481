"""Security by configuration, against real daemons on loopback: TLS and mutual TLS with
certificates made here, bearer tokens per role, and the bindings (a tenant key asks only as
its tenant, an edge reports only as itself, only publishers publish)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudd.config import CloudConfig, LLMConfig
from cloudd.server import Cloudd
from edged.config import EdgeAuthConfig
from edged.server import Edged
from tests.certs import CA
from tests.conftest import ask, running
from tests.fake_llm import FAKE_MODEL, FakeLLM, fake_tokens
from trainerd.config import TrainerConfig
from trainerd.export import export_mlp_policy
from trainerd.server import Trainerd
from velo.runtime.config import ConfigError
from velo.runtime.security import AuthConfig, TLSConfig, dial, new_token, token_sha256
from velo.v1 import (
    cloud_pb2,
    cloud_pb2_grpc,
    edge_pb2,
    edge_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)


def tokens_file(path: Path, entries: list[tuple[str, str, str]]) -> str:
    """Write a tokens file for (token, role, name) entries; returns its path."""
    path.write_text("".join(f'[[token]]\nsha256 = "{token_sha256(t)}"\nrole = "{role}"\n'
                            f'name = "{name}"\n\n' for t, role, name in entries))
    return str(path)


@pytest.fixture(scope="module")
def fake_llm():
    server = FakeLLM().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = CA(folder / "ca"), CA(folder / "rogue", "rogue-ca")
    return {"ca": ca, "rogue": rogue, "cloud": ca.issue("cloudd"), "edge": ca.issue("edge-1"),
            "trainer": ca.issue("trainerd"), "user": ca.issue("user"),
            "stranger": rogue.issue("stranger")}


def mtls(pki: dict, who: str, client_auth: bool = True) -> TLSConfig:
    issued = pki[who]
    return TLSConfig(cert_file=str(issued.cert), key_file=str(issued.key),
                     ca_file=str(pki["ca"].path), client_auth=client_auth)


@contextlib.asynccontextmanager
async def cloudd(fake: FakeLLM, **cfg: object) -> AsyncIterator[Cloudd]:
    config = CloudConfig(listen="127.0.0.1:0", shutdown_grace_s=1.0,
                         llm=LLMConfig(base_url=fake.url, model=FAKE_MODEL,
                                       default_max_tokens=4), **cfg)
    async with running(Cloudd(config)) as daemon:
        yield daemon


GENERATE = cloud_pb2.GenerateRequest(prompt="Hi", max_tokens=4)


# -- TLS ------------------------------------------------------------------------------------
async def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(
        fake_llm, pki) -> None:
    async with cloudd(fake_llm, tls=mtls(pki, "cloud")) as daemon:
        address = daemon.grpc.address
        async with dial(address, mtls(pki, "edge")) as channel:
            reply = await cloud_pb2_grpc.CloudServiceStub(channel).Generate(GENERATE, timeout=5)
            assert reply.text == "".join(fake_tokens(4))
        refused = {
            "plaintext": None,
            "TLS without a client certificate": TLSConfig(ca_file=str(pki["ca"].path)),
            "a certificate from another CA": TLSConfig(
                cert_file=str(pki["stranger"].cert), key_file=str(pki["stranger"].key),
                ca_file=str(pki["ca"].path)),
        }
        for what, tls in refused.items():
            async with dial(address, tls) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await cloud_pb2_grpc.CloudServiceStub(channel).Generate(GENERATE, timeout=3)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, what


async def test_a_client_checks_the_server_certificate(fake_llm, pki) -> None:
    # The server shows a certificate from the rogue CA: a client trusting our CA refuses it.
    rogue = TLSConfig(cert_file=str(pki["stranger"].cert), key_file=str(pki["stranger"].key))
    async with cloudd(fake_llm, tls=rogue) as daemon, \
            dial(daemon.grpc.address, TLSConfig(ca_file=str(pki["ca"].path))) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cloud_pb2_grpc.CloudServiceStub(channel).Generate(GENERATE, timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_and_auth_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cert_file"):
        TLSConfig(cert_file=str(tmp_path / "missing.pem"), key_file=str(tmp_path / "k.pem"))
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError, match=r"cert_file.*key_file"):
        TLSConfig(cert_file=str(tmp_path / "c.pem"))
    with pytest.raises(ConfigError, match="client_auth"):
        TLSConfig(client_auth=True)
    bad = tmp_path / "tokens.toml"
    bad.write_text('[[token]]\nsha256 = "abc"\nrole = "tenant"\nname = "acme"\n')
    with pytest.raises(ConfigError, match=r"tokens_file.*64 hex"):
        AuthConfig(tokens_file=str(bad))
    bad.write_text(f'[[token]]\nsha256 = "{"a" * 64}"\nrole = "root"\nname = "x"\n')
    with pytest.raises(ConfigError, match="role must be one of"):
        AuthConfig(tokens_file=str(bad))


# -- tokens ---------------------------------------------------------------------------------
async def test_cloudd_serves_edges_only_and_health_stays_open(fake_llm, tmp_path) -> None:
    edge, tenant = new_token(), new_token()
    auth = AuthConfig(tokens_file=tokens_file(tmp_path / "t.toml",
                                              [(edge, "edge", "edge-1"),
                                               (tenant, "tenant", "acme")]))
    async with cloudd(fake_llm, auth=auth) as daemon:
        address = daemon.grpc.address
        for token, code in (("", grpc.StatusCode.UNAUTHENTICATED),
                            ("velo_not-a-token", grpc.StatusCode.UNAUTHENTICATED),
                            (tenant, grpc.StatusCode.PERMISSION_DENIED)):
            async with dial(address, token=token) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await cloud_pb2_grpc.CloudServiceStub(channel).Generate(GENERATE)
                assert err.value.code() == code, token
        async with dial(address, token=edge) as channel:
            assert (await cloud_pb2_grpc.CloudServiceStub(channel).Generate(GENERATE)).text
        async with dial(address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING


def experience(edge_id: str, seq: int) -> trainer_pb2.Experience:
    return trainer_pb2.Experience(
        edge_id=edge_id, seq=seq, unix_time=1.7e9, correlation=[0.5] * 15, top_p=5,
        embedding=[0.1] * 8, action_mask=[True, True, True], action=1,
        action_probs=[0.2, 0.5, 0.3], delay_s=0.5)


async def test_unauthenticated_publish_and_forged_experience_are_refused(tmp_path) -> None:
    edge1, edge2, publisher = new_token(), new_token(), new_token()
    auth = AuthConfig(tokens_file=tokens_file(tmp_path / "t.toml", [
        (edge1, "edge", "edge-1"), (edge2, "edge", "edge-2"), (publisher, "publisher", "ci")]))
    config = TrainerConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "trainerd"),
                           shutdown_grace_s=1.0, auth=auth)
    policy = export_mlp_policy(None, top_p=5, embed_dim=384, seed=0)
    publish = trainer_pb2.PublishPolicyRequest(name="always-reuse", onnx=policy)
    async with running(Trainerd(config)) as daemon:
        address = daemon.grpc.address
        for token, code in (("", grpc.StatusCode.UNAUTHENTICATED),
                            (edge1, grpc.StatusCode.PERMISSION_DENIED)):
            async with dial(address, token=token) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await trainer_pb2_grpc.TrainerServiceStub(channel).PublishPolicy(publish)
                assert err.value.code() == code
        assert daemon.registry.latest() is None  # nothing was published

        # edge-2 claims edge-1's next sequence numbers: refused, nothing stored.
        async with dial(address, token=edge2) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ReportExperience(iter([experience("edge-1", s) for s in (1, 2, 3)]))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "edge-2" in err.value.details()
        async with dial(address) as channel:  # no token at all
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await trainer_pb2_grpc.TrainerServiceStub(channel).ReportExperience(
                    iter([experience("edge-1", 1)]))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert daemon.store.count() == 0
        # The real edge-1 then reports those numbers: every record is stored.
        async with dial(address, token=edge1) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            ack = await stub.ReportExperience(iter([experience("edge-1", s) for s in (1, 2, 3)]))
            assert (ack.stored, ack.duplicates, ack.conflicts) == (3, 0, 0)
            with pytest.raises(grpc.aio.AioRpcError) as err:  # an edge cannot publish
                await stub.PublishPolicy(publish)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        async with dial(address, token=publisher) as channel:
            info = await trainer_pb2_grpc.TrainerServiceStub(channel).PublishPolicy(publish)
            assert info.version == 1


# -- the whole chain: user -> edge -> cloudd, edge -> trainerd, all mTLS + tokens -------------
async def test_edge_with_mutual_tls_and_tokens_on_every_link(
        edge_config, fake_llm, pki, tmp_path) -> None:
    fake_llm.reset()
    edge_token, user_key, admin_key = new_token(), new_token(), new_token()
    (tmp_path / "edge.token").write_text(edge_token + "\n")
    peers = tokens_file(tmp_path / "peers.toml", [(edge_token, "edge", "edge-sec")])
    users = tokens_file(tmp_path / "users.toml", [(user_key, "tenant", "acme"),
                                                  (admin_key, "admin", "ops")])
    trainer_cfg = TrainerConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "trainerd"),
                                shutdown_grace_s=1.0, tls=mtls(pki, "trainer"),
                                auth=AuthConfig(tokens_file=peers))
    async with cloudd(fake_llm, tls=mtls(pki, "cloud"), auth=AuthConfig(tokens_file=peers)) \
            as cloud, running(Trainerd(trainer_cfg)) as trainer:
        cfg = edge_config(edge_id="edge-sec", cloud=cloud.grpc.address,
                          trainer=trainer.grpc.address, tls=mtls(pki, "edge"),
                          auth=EdgeAuthConfig(tokens_file=users,
                                              token_file=str(tmp_path / "edge.token")))
        async with running(Edged(cfg)) as edge:
            address = edge.grpc.address
            async with dial(address, mtls(pki, "user"), user_key) as channel:
                stub = edge_pb2_grpc.EdgeServiceStub(channel)
                reply = await stub.Ask(ask("What is mutual TLS?", tenant=""))
                assert reply.action == edge_pb2.ACTION_FORWARD and reply.answer
                with pytest.raises(grpc.aio.AioRpcError) as err:  # another tenant's cache
                    await stub.Ask(ask("What is mutual TLS?", tenant="globex"))
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GetStats(edge_pb2.GetStatsRequest())
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            async with dial(address, mtls(pki, "user")) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await edge_pb2_grpc.EdgeServiceStub(channel).Ask(ask("Hi", tenant="acme"))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            async with dial(address, mtls(pki, "user"), admin_key) as channel:
                stub = edge_pb2_grpc.EdgeServiceStub(channel)
                for _ in range(100):  # the experience reaches trainerd over mTLS + token
                    stats = await stub.GetStats(edge_pb2.GetStatsRequest())
                    if stats.experience_sent:
                        break
                    await asyncio.sleep(0.1)
                assert stats.experience_sent == 1 and stats.requests == 1
                assert {p.name: p.up for p in stats.parts} == {
                    "vector_db": True, "cloud": True, "trainer": True}
        assert trainer.store.count("edge-sec") == 1
        (record,) = trainer.store.read("edge-sec")
        assert record.request_id == reply.request_id


def test_velo_token_prints_a_token_and_the_entry_that_admits_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    from velo.runtime.security import TokenTable

    out = subprocess.run([sys.executable, "-m", "velo_cli", "token", "--role", "edge",
                          "--name", "edge-7"], capture_output=True, text=True, check=True).stdout
    token = out.split("\n")[1].strip()
    entry = out[out.index("[[token]]"):]
    (tmp_path / "tokens.toml").write_text(entry)
    principal = TokenTable.load(tmp_path / "tokens.toml").lookup(token)
    assert (principal.role, principal.name) == ("edge", "edge-7")
    assert token not in entry  # the file holds only its sha256
    bad = subprocess.run([sys.executable, "-m", "velo_cli", "token", "--role", "tenant",
                          "--name", "acme\n"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--name must be" in bad.stderr
