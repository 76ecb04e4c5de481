"""docs/configuration.md is generated from the config dataclasses (tools/config_reference.py):
every key of every daemon has a meaning, the example files show every key, and the page is
what the code says today."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import pytest

from velo.core.models import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import config_reference


def test_the_committed_reference_is_complete_and_current() -> None:
    assert config_reference.undocumented() == []
    assert config_reference.missing_from_examples() == []
    assert config_reference.main(["--check"]) == 0


@dataclass
class _Inner:
    # Explained above the field.
    documented: int = 1
    bare: str = "x"


@dataclass
class _Outer:
    name: str = "a"  # explained after the field
    inner: _Inner = field(default_factory=_Inner)


def test_a_key_without_a_comment_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check fails for the reason it exists: a key added without a comment (here
    `inner.bare`) is reported, nested sections included, and the comments it finds are the
    field's own, above it or after it."""
    assert [(k.name, k.meaning) for k in config_reference.keys(_Outer)] == [
        ("name", "explained after the field"), ("inner.documented", "Explained above the field."),
        ("inner.bare", "")]
    monkeypatch.setattr(config_reference, "daemons",
                        lambda: [("demo", "VELO_DEMO", _Outer, ROOT / "systemd" / "edged.toml")])
    assert config_reference.undocumented() == ["demo: inner.bare"]
