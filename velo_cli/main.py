"""The `velo` command: run the stack, ask an edge, replay a workload, run the demo.

    velo up                       start the whole stack on loopback; Ctrl-C stops it
    velo ask "TEXT" [--edge ADDR] [--tenant T] [--stream]
    velo replay --data PATH [--requests N] [--edges A,B,C]
    velo cache list|show|delete|import|export ...   an edge's cached answers (admin)
    velo demo                     up + replay + QoS summary + down, in one go
    velo token --role R --name N  a new bearer token, and its line for a tokens file
    velo train [--mode nearest|all|both] ...   train LRS on the simulator, print every policy
    velo experiment [--figure N ...] [--quick] [--out DIR]   the paper's Fig. 4-10 over seeds
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
from velo_cli import cache

DEFAULT_EDGES = "127.0.0.1:50052,127.0.0.1:50053,127.0.0.1:50054"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "oasst1_dev.jsonl"
BUNDLED_DATA = ROOT / "data" / "oasst1_dev.jsonl"


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
                    help="trainerd = base, cloudd = base+1, edges = base+2... (default 50050)")
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

    ex = sub.add_parser("experiment", help="the paper's evaluation (Fig. 4-10) over seeds: "
                        "figures, results.csv and results.md (needs the trainer extra)")
    ex.add_argument("--data", type=Path, default=None, help="QA JSON lines (default: oasst1 dev)")
    ex.add_argument("--out", type=Path, default=ROOT / "var" / "experiment",
                    help="folder for the reports, CSVs and figures")
    ex.add_argument("--figure", type=int, action="append", choices=range(4, 11),
                    metavar="{4..10}", help="reproduce this figure (repeatable; default: all)")
    ex.add_argument("--all", action="store_true", help="every figure (the default)")
    ex.add_argument("--quick", action="store_true",
                    help="a small version of everything (60 items, few updates): < 3 min")
    ex.add_argument("--seeds", type=int, default=0, help="runs per setting (default 3)")
    ex.add_argument("--updates", type=int, default=0, help="updates per learned policy")
    ex.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="worker processes (default: one per core)")
    ex.add_argument("--pairs", type=Path, default=None,
                    help="run the labelled false-hit benchmark on these question pairs instead "
                    "(JSON lines a/b/label, or GPTCache's text_a/text_b/label list)")
    ex.add_argument("--holdout", type=float, default=0.5,
                    help="with --pairs of positives only: share of `a` sides left out of the "
                    "cache to make negatives (0: cache all, as GPTCache's benchmark)")
    ex.add_argument("--delta", type=float, default=None,
                    help="with --pairs: a bound on the error rate (wrong answers served / "
                    "queries); each reuse rule's threshold is calibrated for it on a "
                    "calibration split and checked on the test split")
    ex.add_argument("--no-lrs", action="store_true",
                    help="with --pairs: skip training LRS (the verifier and cosine curves only)")
    ex.add_argument("--feedback", nargs="*", type=Path, default=None, metavar="FILE",
                    help="learning from feedback: static thresholds against per-row "
                    "calibration on each FILE, recognised from its content: a/b/label pairs "
                    "(duplicate clusters), QA lines with `paraphrases` (restatements; "
                    "conversation-scoped with `history`, multilingual USE when not English); "
                    "default: the shared qqp_pairs_dev, multiturn_dev and xquad_dev files "
                    "(writes feedback.md)")
    ex.add_argument("--multilingual", type=Path, default=None, metavar="FILE",
                    help="cross-lingual reuse with MiniLM and multilingual USE on an xquad-style "
                    "file (writes multilingual.md)")
    ex.add_argument("--multiturn", type=Path, default=None, metavar="FILE",
                    help="conversation-aware keys against last-message keys on any "
                    "conversation file (QA lines with `history`, restated turns with "
                    "`paraphrases`) such as multiturn_dev.jsonl; says what the file cannot "
                    "measure (writes multiturn.md)")
    ex.add_argument("--ablation", nargs="*", type=Path, default=None, metavar="FILE",
                    help="LRS on the paper's state and on the verified state, under eq. 2's and "
                    "the correctness-aware reward, both modes, next to the baselines (Cache-θ "
                    "tuned on the training split), on each FILE of QA lines (default: --data "
                    "and multiturn_dev.jsonl)")
    ex.add_argument("--load", nargs="*", type=Path, default=None, metavar="FILE",
                    help="the learned scheduler on a loaded cloud (8 slots, Azure-trace "
                    "arrivals, one queue for every edge) at utilisations 0.5, 0.9 and 1.2, "
                    "both modes, both rewards, against Cache-θ and the load-adaptive "
                    "threshold tuned on the training split; prints issue 24's targets met or "
                    "missed (writes load.md); on each FILE of QA lines (default: --data and "
                    "multiturn_dev.jsonl)")
    ex.add_argument("--paper-state", action="store_true",
                    help="with --load: also LRS on the paper's state (the ablation)")
    ex.add_argument("--reuse", nargs="*", type=Path, default=None, metavar="FILE",
                    help="reuse at any scale: train the verifier on each FILE's training split "
                    "(a/b/label pairs, or QA lines whose `paraphrases` restate the question), "
                    "calibrate δ by cache size, and print the δ table at three sizes, the share "
                    "of contradictions served and the gap to the cosine threshold on every "
                    "test split (writes reuse.md and verifier.onnx); default: the shared "
                    "qqp, negation and paraphrase pairs and multiturn_dev")
    ex.add_argument("--verifier", type=Path, default=ROOT / "docs" / "reuse" / "verifier.onnx",
                    help="the verifier: of the verified state (--ablation, and the verifier "
                    "threshold of --load), or the one scored "
                    "with --no-retrain (--pairs, --reuse)")
    ex.add_argument("--no-retrain", action="store_true",
                    help="with --pairs or --reuse: score --verifier as it is (its own "
                    "thresholds) on the whole --pairs file / the test splits, train nothing")
    ex.add_argument("--live", action="store_true",
                    help="a small version through the real daemons and the real local LLM, "
                    "next to the simulator on the same requests (writes live.md); with --load, "
                    "a load-aware LRS edge and a tuned static edge through a calm phase, a "
                    "burst and a calm phase on one shared cloudd (writes burst.md)")
    ex.add_argument("--live-requests", type=int, default=40,
                    help="with --live: requests to each of the 4 edges")
    ex.add_argument("--recalibrate", action="store_true",
                    help="measure the edge time again instead of reusing OUT/calibration.json")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from velo.runtime.logs import configure_logging

    quiet = {"ask", "replay", "demo", "train", "experiment", "cache"}
    configure_logging("warning" if args.command in quiet else "info")
    commands = {"up": cmd_up, "ask": cmd_ask, "replay": cmd_replay, "demo": cmd_demo,
                "train": cmd_train, "experiment": cmd_experiment, "token": cmd_token,
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
    for name, address in stack.addresses.items():
        print(f"  {name:9} {address}")
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
                async for chunk in stub.AskStream(request, timeout=300):
                    print(chunk.text, end="", flush=True)
                    done = chunk.done if chunk.HasField("done") else None
                print()
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

    path = args.data or (DEFAULT_DATA if DEFAULT_DATA.exists() else BUNDLED_DATA)
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

    path = args.data or (DEFAULT_DATA if DEFAULT_DATA.exists() else BUNDLED_DATA)
    items = load_qa(path)[: args.items or None]
    latencies = _latencies()
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
                         items, embedder, uri, latencies, args.state_dir / "cache",
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


def _latencies() -> Path:
    path = DEFAULT_DATA.parent / "llm_latency_llmperf.jsonl"
    return path if path.exists() else ROOT / "data" / "llm_latency_llmperf.jsonl"


def _qa_files(given: list[Path], data: Path, flag: str) -> list[Path]:
    """The QA files of `flag` (default: `data` and the conversation data), each checked now: a
    bad file stops here, not in a worker after the first trainings."""
    from velo.core.records import load_qa

    conversations = DEFAULT_DATA.parent / "multiturn_dev.jsonl"
    datas = given or [data] + [p for p in [conversations] if p.exists()]
    for path in datas:
        try:
            load_qa(path)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"velo experiment {flag}: {exc}") from exc
    return datas


def _trace() -> Path:
    path = DEFAULT_DATA.parent / "azure_llm_trace_conv_2023.csv"
    return path if path.exists() else ROOT / "data" / "azure_llm_trace_conv_2023.csv"


def _readable(path: Path, flag: str) -> Path:
    if not path.is_file():
        raise SystemExit(f"velo experiment {flag}: {path} is not a readable file")
    return path


def cmd_experiment(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from tqdm import tqdm

    from lab.experiment import FIGURES, QUICK, Scale, plan, run_experiment, write_reports

    data = args.data or (DEFAULT_DATA if DEFAULT_DATA.exists() else BUNDLED_DATA)
    scale = QUICK if args.quick else Scale()
    if args.seeds:
        scale = replace(scale, seeds=args.seeds)
    if args.updates:
        scale = replace(scale, updates=args.updates)
    figures = sorted(set(args.figure or FIGURES))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.pairs or args.live:
        from lab.experiment import Job, Setting, calibrate, live_experiment, pairs_benchmark
        from lab.pairs import markdown

        cache_dir = ROOT / "var" / "train" / "cache"
        edge_s = calibrate(args.out, data, cache_dir, args.recalibrate)
        job = Job(Setting(), 0, ("lrs",), scale, data, _latencies(), cache_dir, edge_s)
    if args.live and args.load is not None:
        from lab import under_load

        scale = replace(under_load.QUICK if args.quick else under_load.SCALE,
                        **{k: v for k, v in (("updates", args.updates),) if v})
        print(f"velo experiment --live --load: training LRS on the loaded simulator ({data}), "
              f"then a burst through the stack ({args.live_requests} requests to 2 edges)...")
        print(under_load.live_burst(data, args.out, args.live_requests, ROOT / "var" / "burst",
                                    _latencies(), _trace(), cache_dir, edge_s, scale))
        return
    if args.live:
        print(f"velo experiment --live: training LRS on {data}, then the stack "
              f"({args.live_requests} requests to each of 4 edges)...")
        print(live_experiment(job, args.out, args.live_requests, ROOT / "var" / "live"))
        print(f"{args.out / 'live.md'}")
        return
    if args.pairs:
        verifier = _readable(args.verifier, "--verifier") if args.no_retrain else None
        print(f"velo experiment --pairs {args.pairs}: "
              + (f"scoring {verifier} on every pair" if verifier else "training the verifier")
              + f"{'' if args.no_lrs else f' and LRS (on {data})'}, then the benchmark...")
        print(markdown(pairs_benchmark(_readable(args.pairs, "--pairs"), job, args.out,
                                       args.delta, args.holdout, lrs=not args.no_lrs,
                                       verifier=verifier)))
        print(f"\n{args.out / 'pairs.md'}, pairs.csv, pairs.png"
              + ("" if verifier else ", verifier.onnx"))
        return
    if args.reuse is not None:
        from lab import reuse_bench

        shared = DEFAULT_DATA.parent
        files = [_readable(p, "--reuse") for p in args.reuse] or [
            shared / f for f in ("qqp_pairs_dev.jsonl", "negation_pairs_dev.jsonl",
                                 "paraphrase_pairs_dev.jsonl", "multiturn_dev.jsonl")]
        distractors = [p for p in (shared / "oasst1_dev.jsonl", shared / "xquad_dev.jsonl")
                       if p.exists()]
        verifier = _readable(args.verifier, "--verifier") if args.no_retrain else None
        print(f"velo experiment --reuse: {', '.join(p.name for p in files)}"
              + (f", scoring {verifier}" if verifier else ", training the verifier") + "...")
        try:
            reuse_bench.run(files, args.out, ROOT / "var" / "train" / "cache",
                            args.delta or 0.05, verifier_path=verifier,
                            distractor_paths=distractors)
        except ValueError as exc:
            raise SystemExit(f"velo experiment --reuse: {exc}") from None
        print((args.out / "reuse.md").read_text())
        print(f"{args.out / 'reuse.md'}" + ("" if verifier else ", verifier.onnx"))
        return
    if args.load is not None:
        from lab import under_load
        from lab.experiment import calibrate

        datas = _qa_files(args.load, data, "--load")
        cache_dir = ROOT / "var" / "train" / "cache"
        edge_s = calibrate(args.out, data, cache_dir, args.recalibrate)
        scale = replace(under_load.QUICK if args.quick else under_load.SCALE,
                        **{k: v for k, v in (("seeds", args.seeds), ("updates", args.updates))
                           if v})
        cases = under_load.cases_for(datas, scale.seeds)
        print(f"velo experiment --load: {len(cases)} runs ({len(datas)} data sets x 2 modes x "
              f"2 rewards x {len(under_load.UTILISATIONS)} loads x {scale.seeds} seeds), "
              f"{scale.updates} LRS updates each...")
        verifier = args.verifier if args.verifier.is_file() else None
        results = under_load.run_all(cases, scale, _latencies(), _trace(), cache_dir, edge_s,
                                     args.jobs, args.paper_state, verifier)
        text = under_load.report(results, scale)
        (args.out / "load.md").write_text(text)
        print(text)
        return
    if args.ablation is not None:
        from lab import ablation
        from lab.experiment import calibrate

        datas = _qa_files(args.ablation, data, "--ablation")
        cache_dir = ROOT / "var" / "train" / "cache"
        edge_s = calibrate(args.out, data, cache_dir, args.recalibrate)
        cases = [ablation.Case(d, mode, reward, seed) for d in datas
                 for mode in ("nearest", "all") for reward in ablation.REWARDS
                 for seed in range(args.seeds or 1)]
        print(f"velo experiment --ablation: {len(cases)} cases, 2 LRS trainings each...")
        results = ablation.run_all(cases, scale, args.verifier, _latencies(), cache_dir, edge_s,
                                   args.jobs)
        text = f"# Ablation: the paper's state against the verified state\n\n" \
               f"{ablation.markdown(results)}\n"
        (args.out / "ablation.md").write_text(text)
        print(text)
        return
    if args.feedback is not None or args.multiturn or args.multilingual:
        from lab.experiment import (
            feedback_experiment,
            multilingual_experiment,
            multiturn_experiment,
        )

        cache_dir = ROOT / "var" / "train" / "cache"
        if args.multilingual:
            print(multilingual_experiment(args.out, args.multilingual, cache_dir,
                                          args.delta or 0.05))
        if args.multiturn:
            print(multiturn_experiment(args.out, args.multiturn, cache_dir))
        if args.feedback is not None:
            defaults = [DEFAULT_DATA.parent / f"{name}_dev.jsonl"
                        for name in ("qqp_pairs", "multiturn", "xquad")]
            files = args.feedback or [p for p in defaults if p.exists()]
            print(feedback_experiment(args.out, files, cache_dir))
        return
    runs = plan(figures, scale)
    print(f"velo experiment: figures {', '.join(map(str, figures))} on {data}: {len(runs)} runs "
          f"({scale.seeds} seeds), {args.jobs} workers; results in {args.out}")
    started = time.monotonic()
    results = run_experiment(
        figures, scale, data, _latencies(), args.out, ROOT / "var" / "train" / "cache",
        jobs=args.jobs, recalibrate=args.recalibrate,
        progress=lambda it, total: tqdm(it, total=total, desc="runs", unit="run"))
    write_reports(results, figures, scale, args.out, data, started)
    print((args.out / "results.md").read_text().split("\n## ")[0])
    print(f"done in {time.monotonic() - started:.0f} s: {args.out / 'results.md'}, "
          f"results.csv, runs.csv, fig*.png")


if __name__ == "__main__":
    main()
