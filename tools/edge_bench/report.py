"""Printing: the table per cache size, the ratios to the floor and to GPTCache, the Markdown
report."""

from __future__ import annotations


def print_size(result: dict, clients: list[int]) -> None:
    gpts = result.get("gptcache", {})
    top = str(max(clients))
    print("latency, single stream (ms)              p50     p95     p99")
    for name, side in result["velo"].items():
        d = side["decision"]["single_stream"]
        floor = result["floor"][name]
        print(f"VELO, embedder {name}")
        for stage in ("embed", "search", "state", "policy", "total"):
            s = d[stage]
            label = "edge decision" if stage == "total" else "  " + stage
            print(f"  {label:<38}{s['p50_ms']:7.2f} {s['p95_ms']:7.2f} {s['p99_ms']:7.2f}")
        if "verifier" in side["decision"]:
            s = side["decision"]["verifier"]
            print(f"  {'  reuse verifier, top-P rows':<38}{s['p50_ms']:7.2f} {s['p95_ms']:7.2f} "
                  f"{s['p99_ms']:7.2f}")
        if "lrs_policy" in side["decision"]:
            s = side["decision"]["lrs_policy"]
            print(f"  {'  policy if ONNX LRS':<38}{s['p50_ms']:7.2f} {s['p95_ms']:7.2f} "
                  f"{s['p99_ms']:7.2f}")
        for part, label in (("embed", "floor: one embedding"),
                            ("probe", "floor: one IVF128/nprobe10 probe"),
                            ("total", "floor: both, measured together")):
            s = floor[part]
            print(f"  {label:<38}{s['p50_ms']:7.2f} {s['p95_ms']:7.2f} {s['p99_ms']:7.2f}")
        if "grpc_ask" in side:
            s = side["grpc_ask"]["single_stream"]
            print(f"  {'gRPC Ask (hit), at the client':<38}{s['p50_ms']:7.2f} {s['p95_ms']:7.2f} "
                  f"{s['p99_ms']:7.2f}")
            s = side["grpc_ask"]["decision_in_edged"]
            print(f"  {'  of which the decision in edged':<38}{s['p50_ms']:7.2f} "
                  f"{s['p95_ms']:7.2f} {s['p99_ms']:7.2f}")
        for label, ratio in floor_ratios(side, floor).items():
            print(f"  {label:<38}{ratio:7.2f}")
        if "embedder_batched" in floor:
            batched = floor["embedder_batched"]["best"]
            setting = floor["embedder_batched"].get("best_setting", "as edged runs it")
            print(f"  {'embedder alone, best batch (texts/s)':<38}{batched:7.1f}  ({setting})")
            for key, label in (("decision", "decision"), ("grpc_ask", "new-prompt Ask")):
                if key in side:
                    rps = side[key]["throughput"][top]["rps"]
                    print(f"  {label + ' req/s at ' + top + ' / that':<38}{rps / batched:7.2f}")
            if "grpc_ask" in side and "edged_cores" in side["grpc_ask"]["throughput"][top]:
                t = side["grpc_ask"]["throughput"][top]
                print(f"  at {top} clients, cores used by velo-edged {t['edged_cores']:.2f}, "
                      f"by the load generator {t['client_cores']:.2f}")
    for label, g in gpts.items():
        s = g["single_stream"]
        print(f"  {label:<38}{s['p50_ms']:7.2f} {s['p95_ms']:7.2f} {s['p99_ms']:7.2f}")
    print("throughput (req/s), concurrent clients:     " + "  ".join(f"{c:>7}" for c in clients))
    lines = []
    for name, side in result["velo"].items():
        lines.append((f"VELO decision, {name}", side["decision"]["throughput"]))
        if "grpc_ask" in side:
            lines.append((f"VELO gRPC Ask, {name}", side["grpc_ask"]["throughput"]))
        if "grpc_ask_repeated" in side:
            lines.append((f"VELO Ask, repeats kept, {name}",
                          side["grpc_ask_repeated"]["throughput"]))
    for label, t in lines + [(label, g["throughput"]) for label, g in gpts.items()]:
        print(f"  {label:<42}" + "  ".join(f"{t[str(c)]['rps']:7.1f}" for c in clients))
    for glabel, g in gpts.items():
        errors = {c: sum(g["throughput"][str(c)]["errors"].values()) for c in clients}
        if any(errors.values()):
            print(f"  errors, {glabel} (not counted as throughput): " + ", ".join(
                f"{c} clients: {n}" for c, n in errors.items()) + "; " + "; ".join(
                {e for c in clients for e in g["throughput"][str(c)]["errors"]}))
        short = "patched" if g["patched"] else "as shipped"
        for label, t in lines:
            ratios = [t[str(c)]["rps"] / g["throughput"][str(c)]["rps"] for c in clients]
            print(f"  {label[5:] + ' / ' + short:<42}" + "  ".join(f"{r:7.2f}" for r in ratios))
        print(f"  {glabel} keeps: FAISS index {g['memory_mb']['faiss_index']:.0f} MB in memory,"
              f" SQLite file {g['memory_mb']['sqlite_file']:.0f} MB")
    extra = []
    if "milvus_memory_mb" in result:
        m = result["milvus_memory_mb"]
        extra.append(f"Milvus RSS {m['rss']:.0f} MB (anon {m['anon']:.0f} MB)")
    if "text_store_mb" in result:
        extra.append(f"texts file (disk) {result['text_store_mb']:.0f} MB")
    for name, side in result["velo"].items():
        if "grpc_ask" in side:
            extra.append(f"edged RSS ({name}) {side['grpc_ask']['edged_rss_mb']:.0f} MB")
        if "milvus_after_edge_start_mb" in side:
            m = side["milvus_after_edge_start_mb"]
            extra.append(f"Milvus after that edge's index rebuild: RSS {m['rss']:.0f} MB "
                         f"(anon {m['anon']:.0f} MB)")
    if extra:
        print("  " + ", ".join(extra), flush=True)
    for name, side in result["velo"].items():
        prof = side.get("grpc_ask", {}).get("profile", {})
        if "shares" in prof:
            print(f"  where velo-edged's CPU goes ({name}, {top} clients, "
                  f"{prof['samples']} py-spy samples): " + ", ".join(
                      f"{k} {v:.0%}" for k, v in prof["shares"].items() if v >= 0.01))


def best_rps(side: dict) -> float:
    """A system's throughput at its best concurrency."""
    return max(t["rps"] for t in side["throughput"].values())


def floor_ratios(side: dict, floor: dict) -> dict[str, float]:
    """p50s against the floor's p50 (one embedding + one in-process probe)."""
    base = floor["total"]["p50_ms"]
    ratios = {"decision p50 / floor p50": side["decision"]["single_stream"]["total"]["p50_ms"]
              / base}
    if "grpc_ask" in side:
        ratios["Ask p50 / floor p50"] = side["grpc_ask"]["single_stream"]["p50_ms"] / base
    return ratios


def print_wrong_hits(wrong: dict) -> None:
    queries = next(iter(wrong.values()))["queries"]
    print(f"\nlabelled pairs ({queries} queries, half with no right answer cached)")
    print(f"  {'system':<40}  hits  right  wrong  wrong/hits")
    for name, t in wrong.items():
        print(f"  {name:<40}{t['hits']:5d}  {t['right']:5d}  {t['wrong']:5d}  "
              f"{t['wrong_hit_rate']:9.1%}")


def markdown(report: dict) -> str:
    """The table of docs/performance.md: one row per cache size and system, the floor and
    every ratio."""
    clients = report["args"]["clients"].strip("[]").replace(" ", "").split(",")
    top = clients[-1]
    lines = ["| rows | system | p50 / p95 / p99 ms, single stream | × floor (p50) | "
             + " | ".join(f"req/s, {c} client{'s' if c != '1' else ''}" for c in clients)
             + f" | req/s at {top} clients × GPTCache's best (as shipped / patched) |",
             "|---:|---|---|---:|" + "---:|" * len(clients) + "---|"]
    for rows, result in report["sizes"].items():
        gpts = result.get("gptcache", {})

        def vs_gptcache(t: dict, gpts: dict = gpts) -> str:
            return " / ".join(f"{t[top]['rps'] / best_rps(g):.1f}" for g in gpts.values()) or "–"

        for name, side in result["velo"].items():
            floor = result["floor"][name]
            f = floor["total"]
            lines.append(f"| {int(rows):,} | floor, {name}: one embedding + one in-process "
                         f"IVF probe | {f['p50_ms']:.1f} / {f['p95_ms']:.1f} / "
                         f"{f['p99_ms']:.1f} | 1 |" + " |" * len(clients) + " |")
            base = floor["total"]["p50_ms"]
            for key, label in (
                    ("decision", "decision"), ("grpc_ask", "gRPC Ask (hit)"),
                    ("grpc_ask_repeated", "gRPC Ask (hit), repeated prompts not embedded "
                     "again (prompt_vectors = 10000, the default)")):
                if key not in side:
                    continue
                measured = side[key]
                single = measured["single_stream"]
                single = single.get("total", single)  # the decision's is per stage
                lines.append(f"| {int(rows):,} | VELO {name}, {label} | {single['p50_ms']:.1f}"
                             f" / {single['p95_ms']:.1f} / {single['p99_ms']:.1f} | "
                             f"{single['p50_ms'] / base:.2f} | "
                             + " | ".join(f"{measured['throughput'][c]['rps']:.0f}"
                                          for c in clients)
                             + f" | {vs_gptcache(measured['throughput'])} |")
        for label, g in gpts.items():
            s = g["single_stream"]
            errors = sum(sum(g["throughput"][c]["errors"].values()) for c in clients)
            lines.append(f"| {int(rows):,} | {label}"
                         + (f" ({errors} errors, not counted)" if errors else "")
                         + f" | {s['p50_ms']:.1f} / {s['p95_ms']:.1f} / {s['p99_ms']:.1f} | | "
                         + " | ".join(f"{g['throughput'][c]['rps']:.0f}" for c in clients)
                         + " | |")
    return "\n".join(lines) + "\n"
