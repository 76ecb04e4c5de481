"""tools/bench_edge.py's parts: data, measuring, each side, the floor, wrong hits, the report."""
