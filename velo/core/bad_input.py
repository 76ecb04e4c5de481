"""What every daemon says about bad input: how much of it an error may quote, and the rule for
client-chosen request ids. One rule for gRPC, HTTP and every daemon."""

from __future__ import annotations

import re

# How much of a caller's own input an error message may quote: enough to recognise it,
# never enough to make the reply (or the log line) as large as the input.
QUOTE_CHARS = 64
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(rf"[!-~]{{0,{MAX_REQUEST_ID_CHARS}}}")  # printable ASCII, no spaces


def request_id_problem(request_id: str) -> str | None:
    """Why a client-chosen request id cannot be used (it is logged and forwarded), or None."""
    if _REQUEST_ID.fullmatch(request_id):
        return None
    return (f"request_id {clip(request_id)} must be at most {MAX_REQUEST_ID_CHARS} printable "
            "ASCII characters without spaces")


def clip(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text` quoted for an error message or a log line: its repr, cut to `limit` characters
    with the full length said, so that a 10 KB field never comes back as 10 KB."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
