"""The import contract: each package imports only from the layers below it, so that "no daemon
imports lab" and "no daemon imports another" are checked, not promised.

    velo_cli                          the `velo` command: may import everything below
    lab                               simulator, experiments, training: daemons and core
    edged | cloudd | trainerd         the daemons: the core only, never one another
    velo                              the shared core (and the generated stubs, velo.v1)
    velo_client                       the SDK users install: only velo.v1 and velo.security

Imports inside functions count as much as those at the top of a file: a lazy import is still
a dependency. tools/ and tests/ sit outside the contract (they may import anything), and no
package may import them.
"""

from __future__ import annotations

import ast
from pathlib import Path

from velo.models import ROOT

# package -> the packages it may import (besides itself and the standard library/PyPI).
ALLOWED: dict[str, frozenset[str]] = {
    "velo": frozenset(),
    "edged": frozenset({"velo"}),
    "cloudd": frozenset({"velo"}),
    "trainerd": frozenset({"velo"}),
    "lab": frozenset({"velo", "edged", "cloudd", "trainerd"}),
    "velo_cli": frozenset({"velo", "edged", "cloudd", "trainerd", "lab"}),
    "velo_client": frozenset({"velo"}),
}
# Finer rules inside an allowed pair: the SDK reaches into the core only for these modules.
ONLY_MODULES: dict[tuple[str, str], tuple[str, ...]] = {
    ("velo_client", "velo"): ("velo.v1", "velo.security"),
}
OUTSIDE = frozenset({"tools", "tests"})  # may import anything; nothing imports them


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def violations(root: Path, allowed: dict[str, frozenset[str]] = ALLOWED,
               only: dict[tuple[str, str], tuple[str, ...]] = ONLY_MODULES) -> list[str]:
    """Every import under `root` that breaks the contract, as "file:line imports module"."""
    known = set(allowed) | OUTSIDE
    broken = []
    for package in sorted(allowed):
        for path in sorted((root / package).rglob("*.py")):
            for line, module in imported_modules(path):
                target = module.split(".")[0]
                if target == package or target not in known:
                    continue
                prefixes = only.get((package, target))
                if target in allowed[package] and (
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

    write("velo/qos.py", "import numpy\n")
    write("lab/sim.py", "from edged.pipeline import Pipeline\nimport velo.qos\n")
    write("edged/pipeline.py", "from velo import qos\n\ndef f():\n    from lab import sim\n")
    write("cloudd/server.py", "import edged.pipeline\n")
    write("velo_client/_sync.py", "from velo.v1 import edge_pb2\nfrom velo.qos import reward\n")
    assert violations(tmp_path) == ["cloudd/server.py:1 imports edged.pipeline",
                                    "edged/pipeline.py:4 imports lab",
                                    "velo_client/_sync.py:2 imports velo.qos"]
