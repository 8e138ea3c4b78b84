"""Getting one chat completion from an OpenAI-compatible server: retries, backoff, cooldown, deadline,
concurrency and key scrubbing, and nothing about what is asked."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import requests

from backend import deadline
from backend.models import wire
from backend.models.engine import EngineError, EngineUnavailable

RETRY_STATUSES = {429, 500, 502, 503, 504}
COOLDOWN_SECONDS = 10.0


class ServerTransport:
    """Posts to ``{base_url}/chat/completions``. Requests time out after ``timeout``; 429, 5xx and refused
    connections are retried ``max_retries`` times with exponential backoff (``Retry-After`` honoured); at most
    ``concurrency`` requests are in flight through :meth:`map`. When the server is down or too slow, every call fails
    at once for ``cooldown`` seconds instead of waiting out the timeout. The key never appears in an error."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0, max_retries: int = 3,
                 concurrency: int = 8, session: requests.Session | None = None,
                 cooldown: float = COOLDOWN_SECONDS) -> None:  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.cooldown = cooldown
        self.session = session or requests.Session()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="openai")
        self._down_until = 0.0
        self._down_reason = ""
        self._lock = threading.Lock()
        self.requests_sent = 0
        self.tokens_processed = 0  # as the server reports them in "usage"

    def map(self, function: Callable, items: Sequence) -> list:
        """``function`` over ``items``, ``concurrency`` at a time, under the caller's deadline."""
        return list(self._pool.map(deadline.carry(function), items))

    def complete(self, body: dict) -> dict:
        """One chat completion, with retries on 429/5xx and connection errors."""
        self._check_cooldown()
        url = f"{self.base_url}/chat/completions"
        for attempt in range(self.max_retries + 1):
            deadline.check("waiting for the model server")
            try:
                self.requests_sent += 1
                timeout = (deadline.bounded(5.0), deadline.bounded(self.timeout))
                response = self.session.post(url, json=body, headers=self._headers(), timeout=timeout)
            except requests.Timeout:
                deadline.check("waiting for the model server")  # our time ran out, not the server's
                raise self._went_down(
                    f"the model server at {self.base_url} did not answer within {self.timeout:g} s"
                ) from None
            except requests.ConnectionError:
                if attempt < self.max_retries:
                    time.sleep(deadline.bounded(self._backoff(attempt, None)))
                    continue
                raise self._went_down(
                    f"cannot connect to the model server at {self.base_url} (OPENAI_BASE_URL)"
                ) from None
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                time.sleep(deadline.bounded(self._backoff(attempt, response.headers.get("Retry-After"))))
                continue
            return self._parse(response, str(body.get("model")))
        raise AssertionError("unreachable")

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _parse(self, response: requests.Response, model: str) -> dict:
        if response.status_code in RETRY_STATUSES:
            raise self._went_down(f"the model server at {self.base_url} kept answering HTTP {response.status_code}")
        if response.status_code in (401, 403):
            raise EngineUnavailable(
                f"the model server at {self.base_url} refused the key (HTTP {response.status_code}); "
                "check OPENAI_API_KEY"
            )
        if response.status_code == 400 and "context length" in response.text:  # vLLM's and SGLang's wording
            raise EngineError(
                f"the question is longer than the model server's context ({self.context_length(model)} tokens: "
                "max_model_len in its /v1/models); serve the model with a larger --max-model-len (vLLM; "
                "--context-length for SGLang), or ask about fewer labels at once"
            )
        if response.status_code >= 400:
            raise EngineError(
                f"the model server answered HTTP {response.status_code}: {self._scrub(response.text[:300])}"
            )
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if not wire.is_chat_completion(payload):
            raise EngineError(f"the model server at {self.base_url} sent an answer that is not a chat completion")
        self.tokens_processed += wire.used_tokens(payload)
        return payload

    def context_length(self, model: str) -> str:
        """The served model's ``max_model_len`` as ``/v1/models`` lists it (vLLM, SGLang), or "unknown"."""
        try:
            listed = self.session.get(f"{self.base_url}/models", headers=self._headers(), timeout=5).json()["data"]
            return str(next(int(m["max_model_len"]) for m in listed if m.get("id") == model))
        except (requests.RequestException, ValueError, KeyError, TypeError, StopIteration):
            return "unknown"

    @staticmethod
    def _backoff(attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(30.0, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return min(8.0, 0.5 * 2**attempt) * (0.5 + random.random() / 2)

    def _went_down(self, reason: str) -> EngineUnavailable:
        """Record a server failure: for a while, fail fast instead of making every task wait out the timeout."""
        with self._lock:
            self._down_until = time.monotonic() + self.cooldown
            self._down_reason = reason
        return EngineUnavailable(reason)

    def _check_cooldown(self) -> None:
        with self._lock:
            if time.monotonic() < self._down_until:
                raise EngineUnavailable(f"{self._down_reason} (retrying after a {self.cooldown:g} s pause)")
