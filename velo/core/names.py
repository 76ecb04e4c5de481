"""Names that travel: tenants and edge ids go into Milvus filters, collection names, SQLite
keys, file names and logs, so they use a closed alphabet everywhere (edged, trainerd, cache).
"""

from __future__ import annotations

import re

from velo.core.conversation import is_scope

MAX_NAME_CHARS = 64
# Always fullmatch: `^...$` with re.match accepts a trailing newline ("acme\n").
_NAME = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_NAME_CHARS}}}")
NAME_RULE = f"1-{MAX_NAME_CHARS} characters of letters, digits, '_', '.', '-'"


def valid_name(name: str) -> bool:
    """True for a usable tenant or edge id."""
    return bool(_NAME.fullmatch(name))


def valid_scope(name: str) -> bool:
    """True for a vector-cache scope: a tenant, or a conversation scope (velo.core.conversation)."""
    return valid_name(name) or is_scope(name)
