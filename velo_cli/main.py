"""The `velo` command: run the stack, ask an edge, replay a workload, run the demo.

    velo up                       start the whole stack on loopback; Ctrl-C stops it
    velo ask "TEXT" [--edge ADDR] [--tenant T] [--stream]
    velo replay --data PATH [--requests N] [--edges A,B,C]
    velo cache list|show|delete|import|export ...   an edge's cached answers (admin)
    velo demo                     up + replay + QoS summary + down, in one go
    velo token --role R --name N  a new bearer token, and its line for a tokens file
    velo train [--mode nearest|all|both] ...   train LRS on the simulator, print every policy
    velo experiment WHAT ...      figures (the paper's Fig. 4-10), pairs, reuse, load, live, ...
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc

from velo.core.models import ROOT
from velo_cli import cache, experiment
from velo_cli.data import latencies, qa_data

DEFAULT_EDGES = "127.0.0.1:50052,127.0.0.1:50053,127.0.0.1:50054"


DISTRIBUTION = "velo-edge-cache"  # the name on PyPI ("velo" there is another project)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    """Every command and option of `velo` (each option says what it does: a test checks)."""
    parser = argparse.ArgumentParser(prog="velo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{DISTRIBUTION} {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start Milvus, the local LLM, trainerd, cloudd and N edges")
    _stack_args(up)
    up.add_argument("--base-port", type=int, default=50050,
                    help="trainerd = base, cloudd = base+1, edges = base+2..., each daemon's "
                         "Prometheus /metrics on its port + 100 (default 50050; 0: free ports)")
    up.add_argument("--http-port", type=int, default=8080,
                    help="the edges' OpenAI-compatible fronts: edge-1 on this port, edge-2 on "
                         "the next... (default 8080; 0: none)")

    ask = sub.add_parser("ask", help="ask one edge a question")
    ask.add_argument("text", help="the question")
    ask.add_argument("--edge", default=DEFAULT_EDGES.split(",")[0],
                     help="the edge's address (default: the first edge of `velo up`)")
    ask.add_argument("--tenant", default=None,
                     help="cache namespace to ask in (default: the --api-key's own tenant, "
                     "else 'default')")
    ask.add_argument("--max-tokens", type=int, default=0,
                     help="cap on generated tokens (0: the edge's default)")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    _client_args(ask)

    rep = sub.add_parser("replay", help="replay a QA workload through running edges")
    _replay_args(rep)
    rep.add_argument("--edges", default=DEFAULT_EDGES, help="comma-separated edge addresses")
    _client_args(rep)

    cache.add_parser(sub, DEFAULT_EDGES.split(",")[0], _client_args)

    tok = sub.add_parser("token", help="make a bearer token and print its tokens-file entry")
    tok.add_argument("--role", required=True, choices=["tenant", "admin", "edge", "publisher"],
                     help="what the token may do: ask as one tenant, read stats (admin), act "
                     "as an edge, or publish policies")
    tok.add_argument("--name", required=True,
                     help="the tenant (role tenant), edge id (role edge) or a label")

    demo = sub.add_parser("demo", help="start the stack, replay a workload, summarise, stop")
    _stack_args(demo)
    _replay_args(demo)

    tr = sub.add_parser("train", help="train LRS and the learned baselines on the simulator, "
                        "then evaluate every policy (needs the trainer extra)")
    tr.add_argument("--data", type=Path, default=None, help="QA JSON lines (default: oasst1 dev)")
    tr.add_argument("--items", type=int, default=0, help="use the first N items (0: all)")
    tr.add_argument("--edges-count", type=int, default=3, dest="edge_count",
                    help="number of simulated edges N (as in `velo up`; `velo replay --edges` "
                    "takes addresses)")
    tr.add_argument("--mode", choices=["nearest", "all", "both"], default="both",
                    help="each request to its nearest edge, to all edges (fastest wins), or both")
    tr.add_argument("--w", type=float, default=0.1, help="delay weight w = phi2/phi1")
    tr.add_argument("--updates", type=int, default=40, help="network updates u per policy")
    tr.add_argument("--rollout-steps", type=int, default=64,
                    help="steps per update (x N edges transitions)")
    tr.add_argument("--eval-steps", type=int, default=150,
                    help="test steps per policy, from empty caches")
    tr.add_argument("--demos", type=int, default=2048,
                    help="l_g: expert demonstrations collected and mixed into the first update")
    tr.add_argument("--policies", default="random,greedy-0.1,greedy-0.3,greedy-0.5,cache-0.5,"
                    "greedy-llm,mappo,g-mappo,t-mappo,lrs,oracle",
                    help="comma-separated policies to train (learned) and evaluate")
    tr.add_argument("--seed", type=int, default=0, help="seed of training and test streams")
    tr.add_argument("--milvus-uri", default="", help="an existing Milvus (default: embedded)")
    _milvus_token_arg(tr)
    tr.add_argument("--state-dir", type=Path, default=ROOT / "var" / "train",
                    help="embeddings cache and the trained policies")

    experiment.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from velo.runtime.logs import configure_logging

    quiet = {"ask", "replay", "demo", "train", "experiment", "cache"}
    configure_logging("warning" if args.command in quiet else "info")
    commands = {"up": cmd_up, "ask": cmd_ask, "replay": cmd_replay, "demo": cmd_demo,
                "train": cmd_train, "experiment": experiment.run, "token": cmd_token,
                "cache": lambda a: cache.run(a, _tls(a))}
    commands[args.command](args)


def _stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--edges-count", type=int, default=3, dest="edge_count",
                   help="number of edges to start")
    p.add_argument("--policies", default="lrs,cache-0.5,random",
                   help="policy per edge, cycled: a baseline, or lrs (the learned policy "
                   "shipped in velo/ops/policies/lrs-load.onnx, published through trainerd at "
                   "start); default: the learned policy beside two baselines")
    p.add_argument("--state-dir", type=Path, default=ROOT / "var" / "stack",
                   help="Milvus data, daemons' state and logs")
    p.add_argument("--milvus-uri", default="",
                   help="use this Milvus server instead of starting the embedded one")
    _milvus_token_arg(p)


def _milvus_token_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--milvus-token", default=os.environ.get("VELO_MILVUS_TOKEN", ""),
                   help="the token (user:password) of the --milvus-uri server, when it has "
                   "authentication on (default: $VELO_MILVUS_TOKEN; the embedded server's is "
                   "its own)")


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", default=os.environ.get("VELO_API_KEY", ""),
                   help="bearer token for edges with auth on (default: $VELO_API_KEY)")
    p.add_argument("--tls-ca", default="", help="CA bundle (PEM): talk TLS to the edges")
    p.add_argument("--tls-cert", default="", help="client certificate (PEM), for mutual TLS")
    p.add_argument("--tls-key", default="", help="its private key (PEM)")


def _tls(args: argparse.Namespace):
    from velo.runtime.security import TLSConfig

    return TLSConfig(cert_file=args.tls_cert, key_file=args.tls_key, ca_file=args.tls_ca)


def _replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=None,
                   help="QA JSON lines (default: shared/data/oasst1_dev.jsonl or the bundled copy)")
    p.add_argument("--requests", type=int, default=90, help="requests to replay")
    p.add_argument("--max-tokens", type=int, default=48, help="cap on generated tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the Zipf request stream")
    p.add_argument("--tenant", default=None, help="cache namespace the requests use "
                   "(default: the --api-key's own tenant, else 'demo')")


def _stack(args: argparse.Namespace, base_port: int, http_port: int = 0):
    from velo.ops.stack import Stack, StackConfig

    return Stack(StackConfig(data_dir=args.state_dir, edges=args.edge_count,
                             edge_policies=tuple(args.policies.split(",")), base_port=base_port,
                             http_port=http_port, milvus_uri=args.milvus_uri,
                             milvus_token=args.milvus_token))


def cmd_up(args: argparse.Namespace) -> None:
    stack = _stack(args, args.base_port, args.http_port)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    # Both, installed before anything starts: SIGTERM (systemd, kill) must stop the children
    # as surely as Ctrl-C, and KeyboardInterrupt may land anywhere.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print("starting the VELO stack (Milvus, trainerd, cloudd with SmolLM2 via llama.cpp, "
          "edges)...")
    try:
        stack.start()
    except RuntimeError as exc:
        sys.exit(f"velo up: the stack did not start: {exc}")
    print("VELO is up:")
    metrics = stack.metrics_urls
    for name, address in stack.addresses.items():
        print(f"  {name:9} {address:21} metrics {metrics[name]}")
    print(f"  milvus    {stack.milvus_uri}")
    for name, url in stack.http_urls.items():
        print(f"  {name:9} OpenAI-compatible: base_url={url}")
    print(f"logs in {stack.logs} (the LLM's in llm.log); try: velo ask \"What is Milvus?\" "
          f"--edge {stack.edge_addresses[0]}\nCtrl-C stops everything; a daemon that dies is "
          "restarted.")
    while not stopping:
        for name in stack.supervise():
            print(f"restarted {name} (see {stack.logs / (name + '.log')})")
        time.sleep(0.5)
    print("\nstopping...")
    stack.stop()
    print("stopped.")


def cmd_ask(args: argparse.Namespace) -> None:
    from velo.ops.replay import LETTER
    from velo.runtime.security import dial
    from velo.v1 import edge_pb2, edge_pb2_grpc

    async def run() -> None:
        async with dial(args.edge, _tls(args), args.api_key) as channel:
            stub = edge_pb2_grpc.EdgeServiceStub(channel)
            request = edge_pb2.AskRequest(prompt=args.text,
                                          tenant=_tenant(args.tenant, args.api_key, "default"),
                                          max_tokens=args.max_tokens)
            if args.stream:
                done = None
                async for chunk in stub.AskStream(request, timeout=300):
                    print(chunk.text, end="", flush=True)
                    done = chunk.done if chunk.HasField("done") else None
                print()
                if done is None:
                    sys.exit("velo ask: the stream ended without its final chunk")
            else:
                done = await stub.Ask(request, timeout=300)
                print(done.answer)
            bypass = f", not reused: {', '.join(done.bypass)}" if done.bypass else ""
            print(f"[action {LETTER[done.action]} by {done.policy} on {done.edge_id}, "
                  f"{done.delay_s:.3f} s, finish {done.finish_reason}, "
                  f"{done.usage.completion_tokens} tokens{bypass}]", file=sys.stderr)

    try:
        asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        sys.exit(f"velo ask: {exc.code().name}: {exc.details()}")


def _tenant(asked: str | None, api_key: str, default: str) -> str:
    """The tenant to send: the one asked for; else none with an API key (the key names its
    tenant, and an edge refuses a key asking as another); else the default."""
    if asked is not None:
        return asked
    return "" if api_key else default


def _load(args: argparse.Namespace):
    from velo.core.records import load_qa
    from velo.ops.workload import zipf_workload

    path = qa_data(args.data)
    items = load_qa(path)
    # Very long prompts only slow the tiny local LLM down; they teach nothing extra here.
    arrivals = zipf_workload(items, args.requests, seed=args.seed, max_chars=400)
    return path, items, arrivals


def _replay(args: argparse.Namespace, edges: list[str], names: dict[str, str],
            tls=None, api_key: str = "") -> int:
    """Replay the workload and print the QoS table; returns the number of failed requests."""
    from velo.ops.replay import LEGEND, replay, summary_table

    path, items, arrivals = _load(args)
    distinct = len({a.item.id for a in arrivals})
    print(f"replaying {len(arrivals)} requests ({distinct} distinct questions, Zipf) "
          f"from {path} through {len(edges)} edges")
    started = time.monotonic()
    outcomes = asyncio.run(replay(arrivals, edges, items,
                                  tenant=_tenant(args.tenant, api_key, "demo"),
                                  max_tokens=args.max_tokens, tls=tls, api_key=api_key))
    print(f"\nQoS summary ({time.monotonic() - started:.1f} s; q = -||emb(answer) - "
          "emb(reference)||, reward = q - 0.1 d)\n")
    print(summary_table(outcomes, names))
    print(f"\n{LEGEND}")
    errors = [o for o in outcomes if o.action == "error"]
    if errors:
        print(f"\n{len(errors)} of {len(outcomes)} requests failed, e.g.: {errors[0].error}",
              file=sys.stderr)
    return len(errors)


def cmd_replay(args: argparse.Namespace) -> None:
    from velo.ops.diagnose import edge_health

    edges = args.edges.split(",")
    if _replay(args, edges, {}, _tls(args), args.api_key):
        print("what is down:", file=sys.stderr)
        for address in edges:
            print(f"  edge {address}: {edge_health(address, _tls(args), args.api_key)}",
                  file=sys.stderr)
        sys.exit(1)


def cmd_demo(args: argparse.Namespace) -> None:
    stack = _stack(args, 0)
    print("starting the VELO stack on loopback (Milvus, trainerd, cloudd with SmolLM2 via "
          f"llama.cpp, {args.edge_count} edges)...")
    started = time.monotonic()
    try:
        stack.start()
    except RuntimeError as exc:
        sys.exit(f"velo demo: the stack did not start: {exc}")
    print(f"up in {time.monotonic() - started:.1f} s: " +
          ", ".join(f"{n} {a}" for n, a in stack.addresses.items()))
    failed, diagnosis = 0, {}
    try:
        policies = args.policies.split(",")
        names = {a: f"{n} ({policies[i % len(policies)]})"
                 for i, (n, a) in enumerate((n, a) for n, a in stack.addresses.items()
                                            if n.startswith("edge-"))}
        failed = _replay(args, stack.edge_addresses, names)
        if failed:
            diagnosis = stack.diagnose()
    finally:
        print("\nstopping the stack...")
        stack.stop()
        print("stopped.")
    if failed:
        print("what was down:", file=sys.stderr)
        for name, state in diagnosis.items():
            print(f"  {name}: {state}", file=sys.stderr)
        sys.exit(f"velo demo: {failed} requests failed (logs in {stack.logs})")


def cmd_token(args: argparse.Namespace) -> None:
    from velo.core.names import NAME_RULE, valid_name
    from velo.runtime.security import new_token, token_sha256

    if args.role in ("tenant", "edge") and not valid_name(args.name):
        sys.exit(f"velo token: --name must be {NAME_RULE} for role {args.role}")
    token = new_token()
    print(f"token (give it to the {args.role}; it is not stored anywhere):\n  {token}\n")
    print("add to the tokens file of the daemons it calls:\n")
    print(f'[[token]]\nsha256 = "{token_sha256(token)}"\nrole = "{args.role}"\n'
          f'name = "{args.name}"')


def cmd_train(args: argparse.Namespace) -> None:
    from contextlib import ExitStack

    from lab.sim import SimConfig, SimEnv
    from lab.train import run, table
    from velo.core.models import embedder_dir
    from velo.core.records import load_qa
    from velo.edge.embedder import Embedder
    from velo.learning.lrs import LRSConfig
    from velo.ops.milvus_server import EmbeddedMilvus

    path = qa_data(args.data)
    items = load_qa(path)[: args.items or None]
    modes = ["nearest", "all"] if args.mode == "both" else [args.mode]
    with ExitStack() as stack:
        uri, token = args.milvus_uri, args.milvus_token
        if not uri:
            milvus = stack.enter_context(EmbeddedMilvus(args.state_dir / "milvus"))
            uri, token = milvus.uri, milvus.token
        embedder = Embedder(embedder_dir())
        for mode in modes:
            started = time.monotonic()
            env = SimEnv(SimConfig(edges=args.edge_count, mode=mode, phi2=args.w,
                                   seed=args.seed),
                         items, embedder, uri, latencies(), args.state_dir / "cache",
                         milvus_token=token)
            print(f"\n== {mode}-edge mode: {len(env.items)} QA items from {path}, "
                  f"{args.edge_count} edges, w = {args.w}")
            try:
                results = run(env, policies=args.policies.split(","),
                              lrs_cfg=LRSConfig(seed=args.seed, demos_first=args.demos),
                              updates=args.updates,
                              rollout_steps=args.rollout_steps, eval_steps=args.eval_steps,
                              demos_count=args.demos, seed=args.seed)
            finally:
                env.close()
            print(f"\n{mode}-edge mode, {args.eval_steps} evaluation steps per policy "
                  f"({time.monotonic() - started:.0f} s in all):\n")
            print(table(results))


if __name__ == "__main__":
    main()
