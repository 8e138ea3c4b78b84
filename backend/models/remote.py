"""OpenAI-compatible provider: vLLM, SGLang, Ollama, LM Studio, `transformers serve`, hosted APIs.

Scoring a fixed set of options over HTTP:

- ``"logprobs"`` (servers that return them, e.g. vLLM, SGLang, hosted APIs): the options are
  listed with letters (A, B, …) and the model answers with a letter; each option's score
  is the log-probability of its letter as the first answer token (from ``top_logprobs``).
  Options outside the top list share the probability mass the list leaves over.
- ``"agreement"`` (servers that return no log-probabilities, e.g. ``transformers serve``):
  the question is asked ``samples`` times (the first greedy, the rest at temperature 1)
  and an option's probability is its share of the answers, smoothed:
  ``(count + 0.5) / (samples + 0.5 · n_options)``. An answer that names no option is mapped
  to the nearest label by text embeddings when a mapper is given (and counts for none if
  nothing is similar enough), so a model that never answers inside the label set gets the uniform distribution:
  maximal doubt. A server that ignores temperature makes every sample the same; the score
  then says only whether the model answered inside the label set.

More than 26 options are always scored by agreement, with the label text as the answer.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import requests
from PIL import Image

from backend import deadline
from backend.models.engine import EngineError, EngineUnavailable, Generation, OptionScores
from backend.prompts import LETTERS, lettered_question

log = logging.getLogger(__name__)

SMOOTHING = 0.5
MAX_IMAGE_SIDE = 2048
TOP_LOGPROBS = 20
RETRY_STATUSES = {429, 500, 502, 503, 504}
COOLDOWN_SECONDS = 10.0


def image_data_url(image: Image.Image) -> str:
    """PNG for small images (lossless crops), JPEG for large ones; longest side at most 2048."""
    if max(image.size) > MAX_IMAGE_SIDE:
        image = image.copy()
        image.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    buffer = io.BytesIO()
    if image.width * image.height > 512 * 512:
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
        mime = "image/jpeg"
    else:
        image.save(buffer, format="PNG")
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def match_answer(text: str, options: Sequence[str], lettered: bool) -> int | None:
    """Which option an answer names: its letter ("B", "B.", "(B) dog") or its exact text."""
    answer = text.strip()
    if lettered:  # a lowercase letter followed by a space is the article "a", not option A
        found = re.match(r"^\(?(?:([A-Z])(?:[.):\s]|$)|([a-z])(?:[.):]|$))", answer)
        letter = (found.group(1) or found.group(2)).upper() if found else None
        if letter is not None and LETTERS.index(letter) < len(options):
            return LETTERS.index(letter)
    folded = answer.strip(" .!\"'").casefold()
    for index, option in enumerate(options):
        if folded == option.casefold():
            return index
    return None


class OpenAIEngine:
    """Talks to ``{base_url}/chat/completions`` with images as data URLs."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 8,
        samples: int = 5,
        session: requests.Session | None = None,
        map_answer: Callable[[str, Sequence[str]], int | None] | None = None,
        cooldown: float = COOLDOWN_SECONDS,
    ) -> None:
        self.name = model
        self.model = model
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.samples = samples
        self.map_answer = map_answer
        self.cooldown = cooldown
        self.session = session or requests.Session()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="openai")
        self._has_logprobs: bool | None = None
        self._down_until = 0.0
        self._down_reason = ""
        self._lock = threading.Lock()
        self.requests_sent = 0
        self.tokens_processed = 0  # as the server reports them in "usage"

    def __repr__(self) -> str:
        return f"OpenAIEngine({self.base_url!r}, model={self.model!r})"

    @property
    def scoring_method(self) -> str:
        return "agreement" if self._has_logprobs is False else "logprobs"

    # --- HTTP ---------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def chat(self, image: Image.Image | str, text: str, **options: Any) -> dict:
        """One chat completion about one image (or its data URL, encoded once for several questions), with
        retries on 429/5xx and connection errors."""
        self._check_cooldown()
        body = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": image if isinstance(image, str) else image_data_url(image)},
                        },
                        {"type": "text", "text": text},
                    ],
                }
            ],
            "stream": False,
            **options,
        }
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
            return self._parse(response)
        raise AssertionError("unreachable")

    def _parse(self, response: requests.Response) -> dict:
        if response.status_code in RETRY_STATUSES:
            raise self._went_down(f"the model server at {self.base_url} kept answering HTTP {response.status_code}")
        if response.status_code in (401, 403):
            raise EngineUnavailable(
                f"the model server at {self.base_url} refused the key (HTTP {response.status_code}); "
                "check OPENAI_API_KEY"
            )
        if response.status_code >= 400:
            detail = self._scrub(response.text[:300])
            raise EngineError(f"the model server answered HTTP {response.status_code}: {detail}")
        try:
            payload = response.json()
            payload["choices"][0]["message"]
            self.tokens_processed += int((payload.get("usage") or {}).get("total_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError):
            raise EngineError(
                f"the model server at {self.base_url} sent an answer that is not a chat completion"
            ) from None
        return payload

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

    # --- the Engine interface ----------------------------------------------------------

    def score_options(self, images: Sequence[Image.Image], prompt: str, options: Sequence[str]) -> OptionScores:
        if not options:
            raise EngineError("no options to score")
        rows = list(self._pool.map(deadline.carry(lambda image: self._score_one(image, prompt, options)), images))
        logprobs = np.vstack([row for row, _ in rows]) if rows else np.empty((0, len(options)))
        return OptionScores(options=tuple(options), logprobs=logprobs, mapped=np.array([m for _, m in rows]))

    def _score_one(self, image: Image.Image, prompt: str, options: Sequence[str]) -> tuple[np.ndarray, float]:
        """Scores for one image, and the share of its answers that were mapped from out-of-set text."""
        image_url = image_data_url(image)  # once: the samples below send the same image
        lettered = len(options) <= len(LETTERS)
        asked_lettered = tuple(options) == LETTERS[: len(options)]  # the prompt already lists them by letter
        question = lettered_question(prompt, options) if lettered and not asked_lettered else prompt
        if lettered and self._has_logprobs is not False:
            first = self.chat(
                image_url, question, max_tokens=4, temperature=0, logprobs=True, top_logprobs=TOP_LOGPROBS
            )
            scores = _letter_logprobs(first, len(options))
            if scores is not None:
                self._has_logprobs = True
                return scores, 0.0
            if self._has_logprobs is None:
                log.warning(
                    "the model server at %s returns no log-probabilities: scoring by sampling agreement "
                    "(%d samples per question)",
                    self.base_url,
                    self.samples,
                )
            self._has_logprobs = False
            answers = [_content(first)]
        else:
            answers = [_content(self.chat(image_url, question, max_tokens=32, temperature=0))]
        answers += [
            _content(self.chat(image_url, question, max_tokens=32, temperature=1.0, seed=seed))
            for seed in range(1, self.samples)
        ]
        counts = np.zeros(len(options))
        mapped = 0
        for answer in answers:
            index = match_answer(answer, options, lettered)
            if index is None and self.map_answer is not None and answer.strip():
                index = self.map_answer(answer, options)  # an out-of-set answer moves to the nearest label
                mapped += index is not None
            if index is not None:
                counts[index] += 1
        return np.log((counts + SMOOTHING) / (len(answers) + SMOOTHING * len(options))), mapped / len(answers)

    def generate(self, images: Sequence[Image.Image], prompt: str, max_new_tokens: int = 32) -> list[Generation]:
        def one(image: Image.Image) -> Generation:
            payload = self.chat(image, prompt, max_tokens=max_new_tokens, temperature=0, logprobs=True)
            content = (payload["choices"][0].get("logprobs") or {}).get("content")
            token_logprobs = tuple(float(t["logprob"]) for t in content) if content else None
            return Generation(_content(payload).strip(), token_logprobs)

        return list(self._pool.map(deadline.carry(one), images))


def _content(payload: dict) -> str:
    return str(payload["choices"][0]["message"].get("content") or "")


def _letter_logprobs(payload: dict, n_options: int) -> np.ndarray | None:
    """Each option letter's log-probability at the first non-blank answer token, or None without logprobs."""
    content = (payload["choices"][0].get("logprobs") or {}).get("content")
    if not content:
        return None
    position = next((t for t in content if str(t.get("token", "")).strip()), None)
    if position is None or not position.get("top_logprobs"):
        return None
    scores = np.full(n_options, -np.inf)
    listed_mass = 0.0
    for candidate in position["top_logprobs"]:
        listed_mass += math.exp(float(candidate["logprob"]))
        token = str(candidate["token"]).strip().rstrip(".):").lstrip("(").upper()
        if len(token) == 1 and token in LETTERS[:n_options]:
            index = LETTERS.index(token)
            scores[index] = np.logaddexp(scores[index], float(candidate["logprob"]))
    unlisted = np.isinf(scores)
    if unlisted.any():
        leftover = max(1.0 - listed_mass, 1e-12)
        scores[unlisted] = math.log(leftover / unlisted.sum())
    return scores
