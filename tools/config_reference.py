"""Write docs/configuration.md: every configuration key of every daemon, its default and what it
means, taken from the config dataclasses themselves (the comment above a field, or after it).

    .venv/bin/python tools/config_reference.py          # rewrite docs/configuration.md
    .venv/bin/python tools/config_reference.py --check  # exit 1 if it is stale or a key has
                                                        # no comment (tests run this)

The dataclasses are the one source: a key added without a comment fails the check, so the
reference cannot fall behind the code.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUTPUT = ROOT / "docs" / "configuration.md"


@dataclass(frozen=True)
class Key:
    name: str  # dotted: "cache.top_p"
    default: str
    meaning: str  # "" when the field has no comment


def daemons() -> list[tuple[str, str, type, Path]]:
    """(daemon, environment prefix, its config class, its example file)."""
    from cloudd.config import CloudConfig
    from edged.config import EdgeConfig
    from trainerd.config import TrainerConfig

    return [("edged", "VELO_EDGED", EdgeConfig, ROOT / "systemd" / "edged.toml"),
            ("cloudd", "VELO_CLOUDD", CloudConfig, ROOT / "systemd" / "cloudd.toml"),
            ("trainerd", "VELO_TRAINERD", TrainerConfig, ROOT / "systemd" / "trainerd.toml")]


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment: the comment lines right above the field, then the one after
    it on its line. Inherited fields come from the class that declares them."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        by_line = {tok.start[0]: tok.string.lstrip("#").strip()
                   for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                   if tok.type == tokenize.COMMENT}
        lines = source.splitlines()
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.ClassDef)
        for node in body.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above: list[str] = []
            line = node.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, by_line[line])
                line -= 1
            after = [by_line[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)
                     if n in by_line]
            comments[node.target.id] = " ".join(above + after).strip()
    return comments


def keys(cls: type, prefix: str = "") -> list[Key]:
    """Every key of `cls`, sections (nested dataclasses) expanded, in declaration order."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    instance = cls()
    found: list[Key] = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            found.extend(keys(kind, f"{prefix}{f.name}."))
            continue
        found.append(Key(prefix + f.name, toml_value(getattr(instance, f.name)),
                         comments.get(f.name, "")))
    return found


def toml_value(value: object) -> str:
    """A default as it is written in the TOML file (None: the key left out)."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | list):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def example_keys(example: Path) -> set[str]:
    """The dotted keys an example file sets or shows commented out (`# key = ...`)."""
    found, section = set(), ""
    for line in example.read_text().splitlines():
        text = line.strip().lstrip("#").strip()
        if match := re.match(r"\[([\w.]+)\]", text):
            section = match.group(1) + "."
        elif match := re.match(r"(\w+)\s*=", text):
            found.add(section + match.group(1))
    return found


def missing_from_examples() -> list[str]:
    return [f"{example.relative_to(ROOT)}: {key.name}" for _, _, cls, example in daemons()
            for key in keys(cls) if key.name not in example_keys(example)]


def render() -> str:
    out = ["# Configuration reference", "",
           "Every key of every daemon, with its default and meaning. Generated from the "
           "config dataclasses by `tools/config_reference.py` (a test fails when this page is "
           "stale or a key has no comment); do not edit by hand.", "",
           "Each daemon reads one TOML file (`--config`; `systemd/<daemon>.toml` are annotated "
           "examples). A key `a.b` is `b` in the `[a]` section. Every key can be overridden "
           "from the environment: the daemon's prefix, then the key with `__` between its "
           "parts, e.g. `VELO_EDGED__CACHE__TOP_P=5`. A bad value stops the daemon with an "
           "error that names the key.", ""]
    for daemon, prefix, cls, example in daemons():
        out += [f"## {daemon}", "",
                f"Environment prefix `{prefix}__`; example file `{example.relative_to(ROOT)}`.",
                "", "| key | default | meaning |", "|---|---|---|"]
        for key in keys(cls):
            default, meaning = (text.replace("|", "\\|") for text in (key.default, key.meaning))
            out.append(f"| `{key.name}` | `{default}` | {meaning} |")
        out.append("")
    return "\n".join(out)


def undocumented() -> list[str]:
    return [f"{daemon}: {key.name}" for daemon, _, cls, _ in daemons() for key in keys(cls)
            if not key.meaning]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="fail if docs/configuration.md is stale or a key has no comment")
    args = parser.parse_args(argv)
    missing = undocumented()
    if missing:
        print("keys without a comment in their config dataclass:\n  " + "\n  ".join(missing),
              file=sys.stderr)
    unshown = missing_from_examples()
    if unshown:
        print("keys the example files do not show (add them, commented out if need be):\n  "
              + "\n  ".join(unshown), file=sys.stderr)
    missing = missing + unshown
    text = render()
    if args.check:
        stale = not OUTPUT.is_file() or OUTPUT.read_text() != text
        if stale:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run tools/config_reference.py",
                  file=sys.stderr)
        return 1 if stale or missing else 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
