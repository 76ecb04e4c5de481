"""Security by configuration: TLS / mutual TLS on every gRPC link, and bearer tokens.

Off by default (the one-machine stack runs on loopback with neither); on real boxes:

    [tls]                                   every daemon: its port, and the links it dials
    cert_file = "/etc/velo/tls/edge-1.pem"  this daemon's certificate (and client certificate)
    key_file = "/etc/velo/tls/edge-1.key"
    ca_file = "/etc/velo/tls/ca.pem"        peers' certificates must chain to this CA
    client_auth = true                      callers of this port must show one (mutual TLS)

    [auth]
    tokens_file = "/etc/velo/tokens.toml"   who may call this daemon (sha256 of each token)
    token_file = "/etc/velo/edge-1.token"   edged only: its own token for cloudd and trainerd

A tokens file lists the sha256 of each accepted token, never the token itself:

    [[token]]
    sha256 = "5e88489..."   # `velo token --role tenant --name acme` prints a new token and this
    role = "tenant"         # tenant (edged users), admin (stats), edge, publisher (trainerd)
    name = "acme"           # the tenant it may use, or the edge id it may report as

A caller sends `authorization: Bearer <token>` metadata. What a role may call is fixed per
daemon (`RequireToken(roles=...)`); the handler then binds the request to the caller's name
(a tenant key cannot ask as another tenant, an edge cannot report as another edge).
Health and reflection stay open, so probes and grpcurl `list` work without a token.
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
import secrets
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc

from velo.runtime.config import is_file, require

ROLES = ("tenant", "admin", "edge", "publisher")

# gRPC's default reconnect back-off grows to minutes; a peer that restarts in a second should
# be reachable again within about a second (an edge once failed B/C for 7.5-10 s after cloudd
# was back).
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass
class TLSConfig:
    # This daemon's certificate and key (PEM): served on its port and, when a server asks
    # for one (mutual TLS), presented on the links it dials.
    cert_file: str = ""
    key_file: str = ""  # see cert_file
    # CA bundle (PEM) that peers' certificates must chain to. Set: the links this daemon
    # dials use TLS and check the server's certificate against it.
    ca_file: str = ""
    # Require callers of this daemon's port to present a certificate signed by ca_file.
    client_auth: bool = False
    # Links dialled: the name expected in the server's certificate, when it is not the host
    # in the address (e.g. dialling an IP address with a certificate for a DNS name).
    server_name: str = ""

    def __post_init__(self) -> None:
        require(bool(self.cert_file) == bool(self.key_file), "cert_file",
                "and key_file must be set together (a certificate needs its private key)")
        for key in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, key)
            require(not path or is_file(path), key, f"{path} is not a readable file")
        require(not self.client_auth or bool(self.ca_file and self.cert_file), "client_auth",
                "needs ca_file (to check client certificates) and cert_file/key_file")

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS for this daemon's port, or None (plaintext) when no certificate is set."""
        if not self.cert_file:
            return None
        return grpc.ssl_server_credentials(
            [(_read(self.key_file), _read(self.cert_file))],
            root_certificates=_read(self.ca_file) if self.ca_file else None,
            require_client_auth=self.client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS for the links this daemon dials, or None (plaintext) when no CA is set."""
        if not self.ca_file:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file) if self.key_file else None,
            certificate_chain=_read(self.cert_file) if self.cert_file else None)


@dataclass
class AuthConfig:
    # Who may call this daemon: a TOML file of token hashes with a role and a name each
    # (see velo.runtime.security). Empty: anyone who can reach the port (the loopback demo).
    tokens_file: str = ""

    def __post_init__(self) -> None:
        require(not self.tokens_file or is_file(self.tokens_file), "tokens_file",
                f"{self.tokens_file} is not a readable file")
        if self.tokens_file:
            try:
                TokenTable.load(self.tokens_file)
            except ValueError as exc:
                require(False, "tokens_file", str(exc))

    def table(self) -> TokenTable | None:
        return TokenTable.load(self.tokens_file) if self.tokens_file else None


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def read_token(path: str) -> str:
    """A token kept in a file (one line; systemd's LoadCredential= puts them in such files)."""
    return Path(path).read_text().strip() if path else ""


# -- tokens ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Principal:
    """Who is calling: a role and the tenant / edge / person the token was issued to."""

    role: str
    name: str


CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("velo_caller",
                                                                           default=None)


def caller() -> Principal | None:
    """The authenticated caller of the RPC being handled (None when auth is off)."""
    return CALLER.get()


def is_loopback(peer: str) -> bool:
    """Whether a caller is on this machine: an IP address, or a gRPC peer such as
    "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000" or "unix:/run/x.sock"."""
    if peer.startswith("unix:"):
        return True
    host = peer
    if peer.startswith(("ipv4:", "ipv6:")):  # gRPC may percent-encode the brackets
        host = unquote(peer.split(":", 1)[1]).rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listens_on_loopback(listen: str) -> bool:
    """Whether "HOST:PORT" binds to this machine only (127.x, ::1, localhost). "0.0.0.0", "[::]",
    an empty host and any other name reach beyond it."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or is_loopback(host)


def require_auth_beyond_loopback(listens: dict[str, str], tokens_file: str,
                                 insecure: bool) -> None:
    """Secure by default: a daemon that listens beyond this machine must know its callers
    (auth.tokens_file) unless its config says `insecure = true` in so many words. `listens`:
    config key -> "HOST:PORT" ("" = not listening)."""
    if tokens_file or insecure:
        return
    for key, listen in listens.items():
        require(not listen or listens_on_loopback(listen), key,
                f"{listen} reaches beyond this machine, and without auth.tokens_file anyone who "
                "reaches it may call it. Make tokens with `velo token --role ... --name ...`, "
                "put their entries in a file and set auth.tokens_file (with [tls] on, keys "
                "travel encrypted), or set insecure = true to accept an open daemon")


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return "velo_" + secrets.token_urlsafe(32)


class TokenTable:
    """Accepted tokens by their sha256: a leaked tokens file gives nobody a usable token."""

    def __init__(self, entries: dict[str, Principal]) -> None:
        self.entries = entries

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: {exc}") from exc
        entries: dict[str, Principal] = {}
        for i, entry in enumerate(data.get("token", [])):
            where = f"{path}: token #{i + 1}"
            digest = str(entry.get("sha256", "")).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"{where}: sha256 must be 64 hex digits (velo token prints it)")
            role, name = entry.get("role"), entry.get("name")
            if role not in ROLES:
                raise ValueError(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: name must be a non-empty string")
            entries[digest] = Principal(role, name)
        return cls(entries)

    def lookup(self, token: str) -> Principal | None:
        return self.entries.get(token_sha256(token)) if token else None


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return ""


class RequireToken(grpc.aio.ServerInterceptor):
    """Let a method run only for a caller whose token has one of the roles it allows;
    methods not in `roles` (health, reflection) are open. The caller is then `caller()`."""

    def __init__(self, table: TokenTable, roles: dict[str, frozenset[str]]) -> None:
        self.table, self.roles = table, roles

    async def intercept_service(self, continuation: Callable[..., Any],
                                details: grpc.HandlerCallDetails,
                                ) -> grpc.RpcMethodHandler | None:
        allowed = self.roles.get(details.method)
        if allowed is None:
            return await continuation(details)
        token = bearer_token(details.invocation_metadata)
        principal = self.table.lookup(token)
        handler = await continuation(details)
        if handler is None:
            return None
        if principal is None:
            why = "is not a known token" if token else "is missing"
            return _denied(handler, grpc.StatusCode.UNAUTHENTICATED,
                           f"{details.method} needs a token ('authorization: Bearer ...' "
                           f"metadata); the one sent {why}")
        if principal.role not in allowed:
            return _denied(handler, grpc.StatusCode.PERMISSION_DENIED,
                           f"{details.method} is not allowed for role {principal.role!r} "
                           f"(allowed: {', '.join(sorted(allowed))})")
        CALLER.set(principal)  # the handler runs in this same context
        return handler


def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
            message: str) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    args = (deny, handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(*args)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(*args)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(*args)
    return grpc.stream_stream_rpc_method_handler(*args)


# -- dialling -------------------------------------------------------------------------------
class _Bearer:
    """Adds `authorization: Bearer <token>` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self.header)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                          details.credentials, details.wait_for_ready)


# grpc.aio files a channel's interceptor under the first call kind it implements, so each kind
# needs its own object.
class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Callable[..., Any],
                                    details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Callable[..., Any],
                                     details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Callable[..., Any],
                                     details: grpc.aio.ClientCallDetails, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Callable[..., Any],
                                      details: grpc.aio.ClientCallDetails, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def dial(address: str, tls: TLSConfig | None = None, token: str = "",
         options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to a VELO daemon: TLS when `tls` has a CA, the bearer `token` on
    every call when given, and a reconnect back-off of at most a second."""
    opts = [*FAST_RECONNECT, *options]
    if tls is not None and tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    interceptors = [kind(token) for kind in (_BearerUnaryUnary, _BearerUnaryStream,
                                             _BearerStreamUnary, _BearerStreamStream)
                    ] if token else None
    credentials = tls.channel_credentials() if tls is not None else None
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=opts,
                                   interceptors=interceptors)
