"""Candidates from a served model over the OpenAI chat-completions protocol (`EndpointConfig`),
through the official `openai` client (async): it speaks the protocol as the servers expect it
(OpenAI, vLLM, TGI, llama.cpp), where a hand-written client would chase their differences.

The client's own retries are off: this module retries, so that each retry is counted and
shown, and so that only what should be retried is (429, 5xx, timeouts, connection errors; a
400 or 401 fails at once, since asking again gives the same answer). A request that fails for
good hands back `Generated(failed=...)` with the status and the server's message: that source
loses this candidate, and the build stops only when more than `max_failed_share` of a
shard's sources fail (`generate._run_generator` judges).

The module is imported only where a build has endpoints (`build.generate_shard`), so the
client's import is paid only there.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC
from typing import Any

import openai

from cpo_data.config_endpoint import NO_KEY, EndpointConfig
from cpo_data.generate import Generated, Request
from cpo_data.identity import endpoint_identity
from cpo_data.select import render_prompt

MESSAGE_CHARS = 300
"""How much of a server's error message a dropped row keeps."""
BEARER = re.compile(r"Bearer\s+\S+")

log = logging.getLogger(__name__)


@dataclass
class RequestCounts:
    """What one generator's requests did (the progress bar's and the summary's counts)."""

    sent: int = 0
    """Sources requested (each counted once, however often it was retried)."""
    retried: int = 0
    """Retries: requests sent again after a 429, a 5xx, a timeout or a lost connection."""
    failed: int = 0
    """Sources whose request failed for good."""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Gave(Exception):
    """A request that will not succeed: `why` says so in one line."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def retry_after_s(headers: Any) -> float | None:
    """The wait a server asked for: `retry-after-ms`, or `Retry-After` in seconds or as an
    HTTP date; None when it asked for none (or said something unreadable)."""
    if headers is None:
        return None
    millis = _seconds(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": HTTP dates are in UTC
        when = when.replace(tzinfo=UTC)
    return max(when.timestamp() - time.time(), 0.0)


def _seconds(value: str | None) -> float | None:
    """A header's number, at least 0; None when absent, unreadable, infinite or NaN."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return max(number, 0.0) if math.isfinite(number) else None


def redact(text: str, key: str) -> str:
    """`text` without the key, nor any bearer token."""
    text = BEARER.sub("Bearer [api key]", text)
    return text.replace(key, "[api key]") if key and key != NO_KEY else text


def _run_in_own_thread(coroutine: Any) -> None:
    """Run `coroutine` to its end in a new event loop in a thread of its own, from a thread
    whose loop is running; its exception comes back here, and an interrupt here (Ctrl-C)
    cancels it and waits for its cleanup (the client closed, what arrived handed over)."""
    finished = threading.Event()

    async def to_the_end() -> None:
        try:
            await coroutine
        finally:
            finished.set()

    loop = asyncio.new_event_loop()
    worker = threading.Thread(target=loop.run_forever, daemon=True)
    worker.start()
    future = asyncio.run_coroutine_threadsafe(to_the_end(), loop)
    try:
        future.result()
    except BaseException:
        future.cancel()
        finished.wait(timeout=30)
        raise
    finally:
        loop.call_soon_threadsafe(loop.stop)
        worker.join()
        loop.close()


def backoff_s(config: EndpointConfig, retry: int, rng: random.Random) -> float:
    """The wait before retry number `retry` (0 first) the server did not set: doubling from
    `backoff_s` up to `max_backoff_s`, a random half of it taken off so that many requests
    refused at once do not all come back at once."""
    ceiling = min(config.backoff_s * 2 ** retry, config.max_backoff_s)
    return ceiling * (0.5 + 0.5 * rng.random())


def _messages(config: EndpointConfig, request: Request) -> list[dict[str, str]]:
    user = render_prompt(config.user_prompt, request.src_lang, request.tgt_lang, request.src)
    messages = [{"role": "system", "content": config.system_prompt}] if config.system_prompt \
        else []
    return messages + [{"role": "user", "content": user}]


def _status_line(error: openai.OpenAIError) -> str:
    if isinstance(error, openai.APIStatusError):
        said = error.body.get("message") if isinstance(error.body, dict) else None
        return f"HTTP {error.status_code}: {said or error.message}"[:MESSAGE_CHARS]
    if isinstance(error, openai.APITimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {error}"[:MESSAGE_CHARS]


def _retryable(error: openai.OpenAIError) -> bool:
    if isinstance(error, openai.APIStatusError):
        return error.status_code == 429 or error.status_code >= 500
    return isinstance(error, openai.APIConnectionError)  # timeouts are connection errors too


class EndpointGenerator:
    """A `StreamingGenerator` over one served model."""

    def __init__(self, config: EndpointConfig):
        self.config = config
        self.name = config.name
        self.identity = endpoint_identity(config)
        self.max_failed_share = config.max_failed_share
        self.counts = RequestCounts()
        self._lock = threading.Lock()
        self._warned_short = False

    def request_counts(self) -> dict[str, int]:
        with self._lock:
            return asdict(self.counts)

    def generate(self, requests: Sequence[Request]) -> list[Generated]:
        results: list[Generated | None] = [None] * len(requests)

        def keep(index: int, generated: Generated) -> None:
            results[index] = generated

        self.generate_each(requests, keep)
        return results  # type: ignore[return-value] - every index was filled

    def generate_each(self, requests: Sequence[Request],
                      done: Callable[[int, Generated], None]) -> None:
        """Every request, `max_concurrency` at a time; `done(index, candidates)` as each
        finishes (the share of failures is the stage's to judge: `generate._run_generator`
        counts them against the whole shard, cached sources included)."""
        if not requests:
            return
        key = self.config.api_key()  # before anything is sent: a missing key names its variable
        coroutine = self._all(list(requests), key, done)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(coroutine)
        else:  # called from inside an event loop (a notebook): a loop of its own, elsewhere
            _run_in_own_thread(coroutine)

    async def _all(self, requests: list[Request], key: str,
                   done: Callable[[int, Generated], None]) -> None:
        from tqdm.auto import tqdm

        config = self.config
        client = openai.AsyncOpenAI(base_url=config.base_url, api_key=key,
                                    timeout=config.timeout_s, max_retries=0)
        progress = tqdm(total=len(requests), desc=f"generate {self.name}", unit="req",
                        disable=None)
        in_flight = [0]

        def show() -> None:
            progress.set_postfix({"in_flight": in_flight[0], "retried": self.counts.retried,
                                  "failed": self.counts.failed}, refresh=False)

        gate = asyncio.Semaphore(config.max_concurrency)
        rng = random.Random(config.seed)

        async def one(index: int) -> None:
            async with gate:
                in_flight[0] += 1
                show()
                try:
                    generated = await self._ask(client, requests[index], rng, show, key)
                finally:
                    in_flight[0] -= 1
            done(index, generated)
            progress.update(1)
            show()

        try:
            tasks = [asyncio.ensure_future(one(i)) for i in range(len(requests))]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise
        finally:
            progress.close()
            await client.close()

    async def _ask(self, client: Any, request: Request, rng: random.Random,
                   show: Callable[[], None], key: str) -> Generated:
        """One source's candidates, retried as the module says (`key`: to keep it out of a
        failure's reason)."""
        config = self.config
        with self._lock:
            self.counts.sent += 1
        retry = 0
        while True:
            try:
                response = await self._create(client, request)
                break
            except _Gave as gave:
                return self._failed(gave.why, key)
            except openai.OpenAIError as error:
                if not _retryable(error) or retry >= config.max_retries:
                    tries = f" (after {retry} retries)" if retry else ""
                    return self._failed(_status_line(error) + tries, key)
                asked = retry_after_s(error.response.headers
                                      if isinstance(error, openai.APIStatusError) else None)
                # The server's wait, never shorter, a random quarter longer (so that requests
                # it refused together do not all return together), cut at max_backoff_s: one
                # header asking for an hour must not hold the shard for an hour.
                wait = (backoff_s(config, retry, rng) if asked is None
                        else min(asked * (1 + 0.25 * rng.random()), config.max_backoff_s))
                retry += 1
                with self._lock:
                    self.counts.retried += 1
                show()
                await asyncio.sleep(wait)
        usage = response.usage
        with self._lock:
            if usage is not None:
                self.counts.prompt_tokens += usage.prompt_tokens or 0
                self.counts.completion_tokens += usage.completion_tokens or 0
        choices = list(response.choices)
        if any(c.message is None for c in choices):
            return self._failed("the server answered a choice without a message", key)
        if all(c.index is not None for c in choices):
            choices.sort(key=lambda c: c.index)
        if len(choices) < config.n and not self._warned_short:
            self._warned_short = True
            log.warning("%s: the server gave %d choices where n is %d (some servers ignore "
                        "n): these sources get fewer candidates", self.name, len(choices),
                        config.n)
        return Generated(texts=[(c.message.content or "").strip() for c in choices],
                         stopped_at_limit=[c.finish_reason == "length" for c in choices])

    async def _create(self, client: Any, request: Request) -> Any:
        config = self.config
        options: dict[str, Any] = {"temperature": config.temperature, "top_p": config.top_p,
                                   "max_tokens": config.max_tokens}
        if config.n != 1:  # some servers refuse `n` altogether
            options["n"] = config.n
        if config.seed is not None:
            options["seed"] = config.seed
        response = await client.chat.completions.create(
            model=config.model, messages=_messages(config, request), **options)
        if not response.choices:
            said = (response.model_extra or {}).get("error")
            message = said.get("message") if isinstance(said, dict) else said
            raise _Gave("the server answered with no choices"
                        + (f": {message}"[:MESSAGE_CHARS] if message else ""))
        return response

    def _failed(self, why: str, key: str) -> Generated:
        """A request given up on; `why` is published (a dropped row's detail), so the key is
        taken out of it: some servers repeat the key they refused in their message."""
        with self._lock:
            self.counts.failed += 1
        return Generated(texts=[], failed=redact(why, key))


def load_endpoint(config: EndpointConfig) -> EndpointGenerator:
    """The generator of one configured endpoint (nothing is contacted until it generates)."""
    return EndpointGenerator(config)
