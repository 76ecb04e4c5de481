"""The import contract: each layer imports only from the layers below it, so that "no daemon
imports lab" and "no daemon imports another" are checked, not promised.

    velo_cli                          the `velo` command: may import everything below
    lab                               simulator, experiments, training
    velo.ops                          `velo up`'s stack, local Milvus, replays: starts the daemons
    edged | cloudd | trainerd         the daemons: the layers below, never one another
    velo.learning                     the learner (LRS), for trainerd and lab
    velo.edge                         the edge's stores: cache, texts, embedders, calibration
    velo.runtime                      how a daemon runs: serving, config, security, metrics
    velo.core                         the rules every part shares, no I/O
    velo.v1                           the generated stubs
    velo_client                       the SDK users install: only velo.v1 and velo.runtime.security

A layer is a package, named by its dotted path; a module belongs to the longest layer name it
starts with. Imports inside functions count as much as those at the top of a file: a lazy import
is still a dependency. tools/ and tests/ sit outside the contract (they may import anything), and
no layer may import them.
"""

from __future__ import annotations

import ast
from pathlib import Path

from velo.core.models import ROOT

_STORES = frozenset({"velo.v1", "velo.core", "velo.runtime", "velo.edge"})
_DAEMONS = frozenset({"edged", "cloudd", "trainerd"})
# layer -> the layers it may import (besides itself and the standard library/PyPI).
ALLOWED: dict[str, frozenset[str]] = {
    "velo": frozenset(),  # the namespace's own __init__
    "velo.v1": frozenset(),
    "velo.core": frozenset({"velo.v1"}),
    "velo.runtime": frozenset({"velo.v1", "velo.core"}),
    "velo.edge": frozenset({"velo.v1", "velo.core", "velo.runtime"}),
    "velo.learning": frozenset({"velo.v1", "velo.core"}),
    "edged": frozenset({"velo.v1", "velo.core", "velo.runtime", "velo.edge"}),
    "cloudd": frozenset({"velo.v1", "velo.core", "velo.runtime"}),
    "trainerd": frozenset({"velo.v1", "velo.core", "velo.runtime", "velo.learning"}),
    "velo.ops": _STORES | {"velo.learning"} | _DAEMONS,
    "lab": _STORES | {"velo.learning", "velo.ops"} | _DAEMONS,
    "velo_cli": _STORES | {"velo.learning", "velo.ops", "lab"} | _DAEMONS,
    "velo_client": frozenset({"velo.v1", "velo.runtime"}),
}
# Finer rules inside an allowed pair: the SDK reaches into the runtime only for these modules.
ONLY_MODULES: dict[tuple[str, str], tuple[str, ...]] = {
    ("velo_client", "velo.runtime"): ("velo.runtime.security",),
}
OUTSIDE = frozenset({"tools", "tests"})  # may import anything; nothing imports them


def layer_of(module: str, layers: set[str] | frozenset[str]) -> str | None:
    """The longest layer name that `module` is, or lies under."""
    found = [name for name in layers if module == name or module.startswith(name + ".")]
    return max(found, key=len) if found else None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file, wherever it stands; `from a import b`
    counts as importing a.b (b may be a module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def violations(root: Path, allowed: dict[str, frozenset[str]] = ALLOWED,
               only: dict[tuple[str, str], tuple[str, ...]] = ONLY_MODULES) -> list[str]:
    """Every import under `root` that breaks the contract, as "file:line imports module"."""
    known = set(allowed) | OUTSIDE
    broken = []
    tops = sorted({name.split(".")[0] for name in allowed})
    for path in sorted(p for top in tops for p in (root / top).rglob("*.py")):
        dotted = ".".join(path.relative_to(root).with_suffix("").parts)
        layer = layer_of(dotted, set(allowed))
        if layer is None:
            continue
        for line, module in imported_modules(path):
            target = layer_of(module, known)
            if target is None or target == layer:
                continue
            prefixes = only.get((layer, target))
            if target in allowed[layer] and (
                    prefixes is None
                    or any(module == p or module.startswith(p + ".") for p in prefixes)):
                continue
            broken.append(f"{path.relative_to(root)}:{line} imports {module}")
    return broken


def test_every_package_imports_only_from_the_layers_below_it() -> None:
    assert violations(ROOT) == []


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The check fails for the reasons it exists: a daemon that imports lab (upward), one
    daemon that imports another, and the SDK reaching into a core module it must not; the
    allowed imports around them pass, lazy ones included."""
    def write(relative: str, text: str) -> None:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    write("velo/core/qos.py", "import numpy\n")
    write("velo/core/state.py",
          "from velo.core import qos\nfrom velo.edge.cache import VectorCache\n")
    write("lab/sim.py", "from edged.pipeline import Pipeline\nimport velo.core.qos\n")
    write("edged/pipeline.py", "from velo.core import qos\n\ndef f():\n    from lab import sim\n")
    write("trainerd/server.py",
          "from velo.learning.lrs import LRS\nfrom velo.ops.stack import up\n")
    write("cloudd/server.py", "import edged.pipeline\n")
    write("velo_client/_sync.py",
          "from velo.v1 import edge_pb2\nfrom velo.runtime.serving import Daemon\n")
    assert violations(tmp_path) == ["cloudd/server.py:1 imports edged.pipeline",
                                    "edged/pipeline.py:4 imports lab.sim",
                                    "trainerd/server.py:2 imports velo.ops.stack.up",
                                    "velo/core/state.py:2 imports velo.edge.cache.VectorCache",
                                    "velo_client/_sync.py:2 imports velo.runtime.serving.Daemon"]
