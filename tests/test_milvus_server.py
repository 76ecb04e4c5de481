"""The embedded Milvus: the config it writes, where it listens, its port, its root password,
stop and restart.

The tests that need a running server use the session's `milvus` fixture (the restart test stops
and starts that one); one starts a second server beside it.
(tools/bench_edge.py --milvus-mmap measures what the mmap option does.)"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from velo.ops.milvus_server import (
    COMPONENTS,
    INNER_API_PORT,
    LOOPBACK,
    TOKEN_FILE,
    EmbeddedMilvus,
)


def written_config(data_dir: Path, mmap: bool = False, auth: bool = True) -> str:
    server = EmbeddedMilvus(data_dir, mmap=mmap, auth=auth)._new_server()
    server.config.resolve()  # writes configs/milvus.yaml, as start() does
    return (data_dir / "configs" / "milvus.yaml").read_text()


def section(config: str, name: str) -> dict[str, str]:
    """The `key: value` lines directly under a top-level section (comments dropped)."""
    lines = config.splitlines()
    start = lines.index(f"{name}:") + 1
    values: dict[str, str] = {}
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next top-level section
        if line.startswith("  ") and not line.startswith("   ") and ":" in line:
            key, value = line.strip().split(":", 1)
            values[key] = value.split("#", 1)[0].strip()
    return values


@pytest.mark.parametrize("mmap", [True, False])
def test_mmap_dir_goes_under_query_node(tmp_path: Path, mmap: bool) -> None:
    lines = written_config(tmp_path, mmap).splitlines()
    query_node = lines.index("queryNode:")
    mmap_lines = [i for i, line in enumerate(lines) if "mmapDirPath" in line]
    if not mmap:
        assert mmap_lines == []
        return
    assert mmap_lines == [query_node + 1]
    assert lines[query_node + 1] == f"  mmapDirPath: {tmp_path.resolve() / 'mmap'}"
    assert (tmp_path / "mmap").is_dir()


def test_components_advertise_loopback_and_stop_without_handoff(tmp_path: Path) -> None:
    config = written_config(tmp_path)
    for name in COMPONENTS:
        assert section(config, name)["ip"] == LOOPBACK, name
    assert section(config, "queryNode")["gracefulStopTimeout"] == "0"


def security(config: str) -> dict[str, str]:
    """The `key: value` lines of common.security."""
    lines = config.splitlines()
    start = lines.index("  security:", lines.index("common:")) + 1
    values = {}
    for line in lines[start:]:
        if not line.startswith("    "):
            break
        if ":" in line and not line.strip().startswith("#"):
            key, value = line.strip().split(":", 1)
            values[key] = value.split("#", 1)[0].strip()
    return values


@pytest.mark.parametrize("auth", [True, False])
def test_authorization_follows_auth(tmp_path: Path, auth: bool) -> None:
    config = written_config(tmp_path, auth=auth)
    assert security(config)["authorizationEnabled"] == ("true" if auth else "false")


def test_api_needs_the_root_token(milvus) -> None:
    """The default password was replaced by one of this data_dir's, kept in root.token (0600);
    without it the API refuses gRPC and REST calls, with it a client works as before."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    path = milvus.data_dir / TOKEN_FILE
    user, password = milvus.token.split(":", 1)
    assert user == "root" and len(password) >= 24 and password != "Milvus"
    assert path.read_text() == milvus.token
    assert path.stat().st_mode & 0o777 == 0o600
    for token in ("", "root:Milvus", "root:" + password[:-1]):
        with pytest.raises(MilvusException, match="illegal connection params"):
            MilvusClient(uri=milvus.uri, token=token).list_collections()
    rest = urllib.request.Request(f"{milvus.uri}/v1/vector/collections")
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(rest, timeout=5)

    name = f"auth_{uuid.uuid4().hex[:8]}"
    client = MilvusClient(uri=milvus.uri, token=milvus.token)
    try:
        client.create_collection(name, dimension=4)
        client.insert(name, [{"id": i, "vector": [float(i), 1.0, 0.0, 0.5]} for i in range(10)])
        hits = client.search(name, data=[[3.0, 1.0, 0.0, 0.5]], limit=1,
                             consistency_level="Strong")
    finally:
        client.drop_collection(name)
        client.close()
    assert hits[0][0]["id"] == 3
    # The readiness probe start() polls needs no credentials.
    assert milvus.healthy()


def test_a_wrong_or_missing_token_file_fails_clearly(milvus, tmp_path: Path) -> None:
    """Checked against the running server: another data_dir's view of the same port."""
    deadline = time.monotonic() + 30
    other = EmbeddedMilvus(tmp_path, port=milvus.port)
    (tmp_path / TOKEN_FILE).write_text("root:not-the-password")
    with pytest.raises(RuntimeError, match=r"refuses the root password in .*root\.token"):
        other._secure(deadline)
    (tmp_path / TOKEN_FILE).unlink()
    # No root.token and the default password refused: the password of the data is unknown.
    with pytest.raises(RuntimeError, match=r"password of its own but .*root\.token is missing"):
        other._secure(deadline)
    # A crash after the password changed, before root.token was written: root.token.new holds
    # the password, and start() takes it.
    (tmp_path / f"{TOKEN_FILE}.new").write_text(milvus.token)
    assert other._secure(deadline) == milvus.token
    assert (tmp_path / TOKEN_FILE).read_text() == milvus.token
    assert not (tmp_path / f"{TOKEN_FILE}.new").exists()


def _string_fields(*values: str) -> bytes:
    """A protobuf message whose fields 2, 3... are these short strings."""
    out = b""
    for number, value in enumerate(values, start=2):
        data = value.encode()
        out += bytes([number << 3 | 2, len(data)]) + data
    return out


def test_the_internal_proxy_port_cannot_set_credentials(milvus) -> None:
    """Milvus's internal proxy port takes calls without credentials; one of them sets the password
    hash the proxy checks logins against. From the host it must be out of reach."""
    import grpc
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    config = (milvus.data_dir / "configs" / "milvus.yaml").read_text()
    internal = f"{LOOPBACK}:{section(config, 'proxy')['internalPort']}"

    def cache_password(password: str) -> None:  # proxypb.UpdateCredCacheRequest
        sha = hashlib.sha256(f"{password}root".encode()).hexdigest()  # Milvus's crypto.SHA256
        with grpc.insecure_channel(internal) as channel:
            channel.unary_unary("/milvus.proto.proxy.Proxy/UpdateCredentialCache",
                                request_serializer=bytes, response_deserializer=bytes,
                                )(_string_fields("root", sha), timeout=5)

    try:
        cache_password("chosen-by-a-stranger")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE  # nothing listens there for the host
    else:
        try:
            with pytest.raises(MilvusException):
                MilvusClient(uri=milvus.uri, token="root:chosen-by-a-stranger").list_collections()
        finally:
            cache_password(milvus.token.split(":", 1)[1])  # what the proxy caches after a login
    MilvusClient(uri=milvus.uri, token=milvus.token).list_collections()


def test_the_webservice_runs_no_expressions_for_the_host(milvus) -> None:
    """The webservice's /expr evaluates expressions on Milvus's components for anyone passing
    etcd.rootPath ("by-dev")."""
    url = (f"http://{LOOPBACK}:{milvus._server.webservice_port}/expr?"
           f"{urllib.parse.urlencode({'code': 'rootcoord != nil', 'auth': 'by-dev'})}")
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            output = reply.read()
    except urllib.error.HTTPError:
        return  # refused
    except urllib.error.URLError as exc:
        assert isinstance(exc.reason, ConnectionRefusedError)  # nothing listens there
        return
    assert b'"true"' not in output


def process_tree(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The name in parentheses may hold spaces: the parent pid is 2nd after it.
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process exited meanwhile
    tree, todo = set(), [pid]
    while todo:
        tree.add(parent := todo.pop())
        todo += [child for child, of in parents.items() if of == parent]
    return tree


def listening_sockets(pids: set[int], seen_by: int | None = None) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets these processes listen on (from /proc, as ss does), in
    the network namespace of process `seen_by` (this process's by default)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    found = set()
    net = Path(f"/proc/{seen_by}/net") if seen_by else Path("/proc/net")
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = net / table
        for line in path.read_text().splitlines()[1:] if path.exists() else []:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            # 32-bit words printed in host byte order; packed back they are the address bytes.
            words = [int(address[i:i + 8], 16) for i in range(0, len(address), 8)]
            raw = struct.pack(f"={len(words)}I", *words)
            found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def test_milvus_listens_only_in_its_own_network(milvus) -> None:
    """Milvus 2.3 listens on ':port' for its API, webservice (9091) and internal gRPC ports (its
    config has no listen address), and its etcd on the fixed 2379/2380: in the host's network
    that exposed them all and allowed one server per machine. In its own namespace the host sees
    only the relay, on loopback, at the port clients use."""
    assert milvus.private, "this machine gives no network namespace (not root?)"
    servers = process_tree(milvus.pid)
    inside = listening_sockets(servers, seen_by=milvus.pid)
    assert {(LOOPBACK, 2379), (LOOPBACK, 2380)} <= inside  # etcd
    assert INNER_API_PORT in {port for _, port in inside}
    assert listening_sockets(servers) == set()  # none of them in the host's network
    assert listening_sockets(process_tree(milvus.relay_pid)) == {(LOOPBACK, milvus.port)}


def test_every_listener_is_loopback(milvus) -> None:
    listeners = listening_sockets(process_tree(milvus.pid) | process_tree(milvus.relay_pid))
    assert listeners
    assert {address for address, _ in listeners} == {LOOPBACK}, sorted(listeners)


@pytest.mark.slow
def test_two_embedded_servers_run_side_by_side(milvus, tmp_path: Path) -> None:
    """A second embedded Milvus (e.g. `velo up` while the tests run) starts beside the session's
    and each serves its own data; with both in the host's network the second one's etcd found
    its fixed ports taken and it exited."""
    from pymilvus import MilvusClient

    with EmbeddedMilvus(tmp_path) as second:
        assert second.uri != milvus.uri
        client = MilvusClient(uri=second.uri, token=second.token)
        try:
            client.create_collection("side", dimension=4)
            client.insert("side", [{"id": i, "vector": [float(i), 1.0, 0.0, 0.5]}
                                   for i in range(5)])
            found = client.query("side", filter="id >= 0", output_fields=["id"],
                                 consistency_level="Strong")
        finally:
            client.close()
        assert sorted(row["id"] for row in found) == list(range(5))
        first = MilvusClient(uri=milvus.uri, token=milvus.token)
        try:
            assert "side" not in first.list_collections()
        finally:
            first.close()


def test_taken_port_fails_clearly(tmp_path: Path) -> None:
    """The package would move to the next free port while .uri kept naming the taken one."""
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedMilvus(tmp_path, port=port)
        try:
            with pytest.raises(RuntimeError, match=f"port {port}: it is already in use"):
                server.start()
        finally:
            server.stop()  # had it started elsewhere


@pytest.mark.slow
def test_stop_is_quick_and_a_restart_keeps_flushed_data(milvus) -> None:
    """Stop the session's server with a loaded collection (the query node used to wait 1800 s
    for a handoff, so every stop ran into SIGKILL) and start it again on the same data_dir: the
    data and the root token survive."""
    from pymilvus import MilvusClient

    name = f"restart_{uuid.uuid4().hex[:8]}"
    rows = [{"id": i, "vector": [float(i), 1.0, 0.0, 0.5]} for i in range(20)]
    client = MilvusClient(uri=milvus.uri, token=milvus.token)
    client.create_collection(name, dimension=4)
    client.insert(name, rows)
    client.flush(name)
    client.load_collection(name)
    client.close()
    uri, token = milvus.uri, milvus.token

    began = time.monotonic()
    milvus.stop()
    stop_s = time.monotonic() - began
    milvus.start()

    assert milvus.token == token  # read back from data_dir/root.token, and accepted
    client = MilvusClient(uri=milvus.uri, token=token)
    try:
        client.load_collection(name)
        found = client.query(name, filter="id >= 0", output_fields=["id", "vector"])
    finally:
        client.drop_collection(name)
        client.close()
    assert milvus.uri == uri  # clients holding the URI reconnect
    assert sorted(row["id"] for row in found) == list(range(20))
    assert [float(x) for x in next(r for r in found if r["id"] == 7)["vector"]] == rows[7]["vector"]
    assert stop_s < 5, f"stop took {stop_s:.1f} s"


@pytest.mark.slow
def test_a_start_whose_server_dies_of_a_signal_is_tried_again(tmp_path: Path) -> None:
    """Seen once in CI: a restart right after a stop aborted at once (SIGABRT, empty log), and
    every later test that needed the server failed. Here the server is killed with SIGABRT
    as soon as it is launched: start() launches it again and returns a server that serves."""
    import signal
    import threading

    from pymilvus import MilvusClient

    server = EmbeddedMilvus(tmp_path)
    killed: list[int] = []

    def kill_the_first_launch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            proc = getattr(server._server, "server_proc", None)
            if proc is not None:
                os.kill(proc.pid, signal.SIGABRT)
                killed.append(proc.pid)
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_the_first_launch)
    killer.start()
    try:
        server.start()
        killer.join()
        assert killed and server.pid not in killed
        client = MilvusClient(uri=server.uri, token=server.token)
        try:
            assert client.list_collections() == []
        finally:
            client.close()
    finally:
        killer.join()
        server.stop()
