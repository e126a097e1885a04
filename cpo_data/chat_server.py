"""A small server of the OpenAI chat-completions protocol on 127.0.0.1, for tests and
benchmarks only: the endpoint generator reaches it through the real `openai` client over real
HTTP. It answers with canned text (or what `answer` returns), counts every request, and fails
or delays the ones a test asks it to (`fail`, `delay_s`).

The standard library's threading HTTP server is enough: one thread per connection, so
`delay_s` holds one request and not the others, as a real server under load would.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SOURCE_IN_PROMPT = re.compile(r": (.*) ### ", re.S)
"""Where ALMA-R's GPT-4 prompt holds the source text."""


def canned_answer(model: str, user: str, choice: int) -> str:
    """A fixed "translation" of a prompt: its source text (as ALMA-R's GPT-4 prompt holds
    it, else the whole message) with the words in reverse order, and the choice's number."""
    found = SOURCE_IN_PROMPT.search(user)
    words = (found.group(1) if found else user).split()
    return " ".join(reversed(words)) + (f" ({choice})" if choice else "")


@dataclass
class Fault:
    """Answer `status` (with `retry_after`, when given) to the next `times` requests whose
    user message contains `when`."""

    status: int
    times: int = 1
    when: str = ""
    retry_after: float | None = None
    message: str = "injected failure"


@dataclass
class Seen:
    """One request as the server got it."""

    at: float
    """time.monotonic() on arrival."""
    body: dict[str, Any]
    authorization: str | None
    status: int = 200


@dataclass
class ChatServer:
    """The server's state; `url` once started (`start`), e.g. http://127.0.0.1:PORT/v1."""

    answer: Callable[[str, str, int], str] = canned_answer
    delay_s: float = 0.0
    """Seconds each answer waits before it is sent."""
    slow: dict[str, float] = field(default_factory=dict)
    """Extra seconds for requests whose user message contains the key, once each."""
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    most_in_flight: int = 0
    """The most requests the server held at once."""
    _in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _http: ThreadingHTTPServer | None = None

    def fail(self, status: int, **options: Any) -> None:
        with self._lock:
            self.faults.append(Fault(status, **options))

    def users(self, status: int | None = 200) -> list[str]:
        """The user messages of the requests seen (answered with `status`; None: all)."""
        with self._lock:
            return [_user(s.body) for s in self.seen if status is None or s.status == status]

    def start(self) -> ChatServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: with Nagle's algorithm on, the body
            # waits for the client's delayed ACK, 40 ms a request.
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:  # quiet: tests read `seen`
                pass

            def do_POST(self) -> None:  # noqa: N802 - the standard library's name
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                status, payload, headers = server._respond(body,
                                                           self.headers.get("authorization"))
                self._send(status, payload, headers)

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up
                    pass

        self._http = _Server(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        # A short poll: `stop` waits for the loop to look, 0.5 s a server by default.
        threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.02},
                         daemon=True).start()
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/v1"
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _respond(self, body: dict, authorization: str | None) -> tuple[int, dict, dict]:
        user = _user(body)
        seen = Seen(time.monotonic(), body, authorization)
        with self._lock:
            self.seen.append(seen)
            fault = next((f for f in self.faults if f.times > 0 and f.when in user), None)
            if fault is not None:
                fault.times -= 1
            extra = next((self.slow.pop(k) for k in list(self.slow) if k in user), 0.0)
            self._in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self._in_flight)
        try:
            time.sleep(self.delay_s + extra)
        finally:
            with self._lock:
                self._in_flight -= 1
        if fault is not None:
            seen.status = fault.status
            headers = {} if fault.retry_after is None else {"retry-after": str(fault.retry_after)}
            return fault.status, {"error": {"message": fault.message, "type": "injected"}}, headers
        model, n = body.get("model", ""), int(body.get("n") or 1)
        texts = [self.answer(model, user, choice) for choice in range(n)]
        words = sum(len(m.get("content", "").split()) for m in body.get("messages", []))
        return 200, {
            "id": f"chatcmpl-{len(self.seen)}", "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": i, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}
                        for i, text in enumerate(texts)],
            "usage": {"prompt_tokens": words,
                      "completion_tokens": sum(len(t.split()) for t in texts),
                      "total_tokens": words + sum(len(t.split()) for t in texts)},
        }, {}


class _Server(ThreadingHTTPServer):
    # The standard library listens with a backlog of 5: 32 clients connecting at once
    # overflowed it, and the refused ones retried their connection a second later.
    request_queue_size = 256


def _user(body: dict) -> str:
    return next((m.get("content", "") for m in reversed(body.get("messages", []))
                 if m.get("role") == "user"), "")
