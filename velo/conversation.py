"""Conversation-aware cache keys.

"What famous landmark is there?" means one thing after "What is the capital of France?" and
another after "... of Italy?". A cache keyed on the last message alone serves the wrong one.
So a turn with history is cached and looked up inside a scope of its own: its tenant plus a
fingerprint of its context (the system prompt and the earlier user messages, normalised for
case and spacing; assistant messages are left out, because the same question asked again gets
a differently worded answer). The same follow-up after the same context finds its answer; after
any other context it finds nothing, never a wrong answer.

The scope is what the vector cache filters on (its `tenant` field): a plain tenant name for a
turn without history, "~" + 32 hex digits for a conversation turn. "~" is outside the tenant
alphabet (velo.names), so a scope never collides with a tenant, and the hash covers the tenant,
so two tenants never share a scope. Restating the first turn in other words starts a new scope
(a miss, not a wrong answer).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

ROLES = ("system", "user", "assistant")
_KEYED_ROLES = frozenset({"system", "user"})
_SPACE = re.compile(r"\s+")
SCOPE_PREFIX = "~"
_SCOPE = re.compile(r"~[0-9a-f]{32}")


def context_key(history: Iterable[tuple[str, str]]) -> str:
    """The fingerprint of a conversation's context from (role, content) messages; "" for none."""
    parts = [f"{role}:{_SPACE.sub(' ', content).strip().lower()}"
             for role, content in history if role in _KEYED_ROLES]
    if not parts:
        return ""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def cache_scope(tenant: str, context: str) -> str:
    """Where a turn is cached: the tenant itself without context, else a scope of its own."""
    if not context:
        return tenant
    return SCOPE_PREFIX + hashlib.sha256(f"{tenant}\0{context}".encode()).hexdigest()[:32]


def is_scope(name: str) -> bool:
    return bool(_SCOPE.fullmatch(name))


MAX_HISTORY_MESSAGES = 64


def history_problem(history: list[tuple[str, str]], max_chars: int) -> str | None:
    """Why a conversation history is unusable, or None."""
    if len(history) > MAX_HISTORY_MESSAGES:
        return f"history has {len(history)} messages; at most {MAX_HISTORY_MESSAGES} are accepted"
    for n, (role, _) in enumerate(history):
        if role not in ROLES:
            return (f"history message {n} has role {role[:20]!r}; use one of "
                    f"{', '.join(ROLES)}")
    chars = sum(len(content) for _, content in history)
    if chars > max_chars:
        return f"history is {chars} characters; at most {max_chars} are accepted"
    return None
