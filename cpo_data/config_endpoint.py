"""A served model as a candidate generator: any server of the OpenAI chat-completions protocol
(OpenAI itself, vLLM, TGI, llama.cpp's server), listed under `generate.endpoints`.

The key stays out of every config, manifest, log line and cache key: the config names only
the environment variable that holds it (`api_key_env`). The cache keys on what decides the
text (the model name, the decoding and the prompt), not on the URL, so a model moved to
another server keeps its cached candidates; two different models served under one name on two
servers must therefore be given distinct `model` names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from cpo_data.fields import _check_at_least, _check_choice, _check_prompt, _fail

OPENAI_COMPATIBLE = "openai_compatible"
ENDPOINT_KINDS = (OPENAI_COMPATIBLE,)

GPT4_SYSTEM_PROMPT = "You are a helpful translator and only output the result."
"""ALMA-R's system prompt for GPT-4's zero-shot candidates (gpt-4-1106-preview)."""
GPT4_USER_PROMPT = "### Translate this from {Src} to {Tgt}, {Src}: {src} ### {Tgt}:"
"""ALMA-R's user prompt for GPT-4; {Src}/{Tgt} are English language names."""

NO_KEY = "unused"
"""What the client sends as the key when `api_key_env` is null (a local server without
authentication): the client refuses to start without one."""


@dataclass(frozen=True)
class EndpointConfig:
    """One served model that translates the sources into candidates over the OpenAI
    chat-completions protocol."""

    name: str
    """System name its candidates carry (e.g. gpt-4)."""
    model: str
    """The model name the server knows (gpt-4-1106-preview, or what vLLM serves)."""
    base_url: str = "https://api.openai.com/v1"
    """The server's API root (http://127.0.0.1:8000/v1 for a local vLLM)."""
    kind: str = OPENAI_COMPATIBLE
    """The protocol: openai_compatible (chat completions)."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the key; null for a server without one."""
    system_prompt: str | None = GPT4_SYSTEM_PROMPT
    """The system message; null or empty sends none."""
    user_prompt: str = GPT4_USER_PROMPT
    """The user message: {Src}, {Tgt} (English names), {src}, {src_lang}, {tgt_lang}."""
    n: int = 1
    """Candidates per source (choices per request; a server may not support more than 1)."""
    temperature: float = 0.0
    """Sampling temperature; 0 for one best translation."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_tokens: int = 256
    """Longest output, in the server's tokens."""
    seed: int | None = 0
    """Sent to the server (best-effort determinism on OpenAI, exact on vLLM); null sends none."""
    max_concurrency: int = 8
    """Requests in flight at once."""
    timeout_s: float = 60.0
    """Seconds one request may take before it counts as timed out (and is retried)."""
    max_retries: int = 6
    """Retries per request on 429, 5xx, timeouts and connection errors; other errors fail
    the request at once."""
    backoff_s: float = 1.0
    """First retry's wait; each later one doubles, up to `max_backoff_s`, with jitter. A
    server's Retry-After is waited instead (never less, up to a quarter more)."""
    max_backoff_s: float = 60.0
    """Longest wait between two tries, a server's Retry-After included."""
    max_failed_share: float = 0.05
    """Share of a shard's requests that may fail for good (the sources lose this candidate,
    with the reason) before the build stops."""

    def __post_init__(self) -> None:
        if not self.name:
            _fail("name", "give the system a name")
        if not self.model:
            _fail("model", "name the model the server serves")
        _check_choice("kind", self.kind, ENDPOINT_KINDS)
        if not self.base_url.startswith(("http://", "https://")):
            _fail("base_url", f"{self.base_url!r} is not an http(s) URL")
        if "@" in urlsplit(self.base_url).netloc:
            # It would be published with the config, logged with every request, and sent
            # in place of the key.
            _fail("base_url", "holds a user or password; put the key in the variable "
                              "api_key_env names")
        if self.api_key_env is not None and not self.api_key_env.strip():
            _fail("api_key_env", "name an environment variable, or null for no key")
        _check_prompt("user_prompt", self.user_prompt)
        _check_at_least(self, 1, "n", "max_tokens", "max_concurrency")
        _check_at_least(self, 0, "max_retries")
        if self.temperature < 0:
            _fail("temperature", "must be 0 or more")
        if self.n > 1 and self.temperature == 0:
            _fail("n", "more than one candidate needs temperature above 0")
        if not 0 < self.top_p <= 1:
            _fail("top_p", "must be in (0, 1]")
        for key in ("timeout_s", "backoff_s", "max_backoff_s"):
            if getattr(self, key) <= 0:
                _fail(key, "must be positive")
        if not 0 <= self.max_failed_share <= 1:
            _fail("max_failed_share", "must be in [0, 1]")

    def api_key(self) -> str:
        """The key from the environment (never stored on the config, never logged)."""
        if self.api_key_env is None:
            return NO_KEY
        key = os.environ.get(self.api_key_env)
        if not key:
            _fail("api_key_env", f"{self.api_key_env} is not set in the environment")
        return key
