"""OpenAI-compatible provider: vLLM, SGLang, Ollama, LM Studio, `transformers serve`, hosted APIs.

Scoring a fixed set of options over HTTP, by the best strategy the server offers (probed on
first use, recorded in :attr:`OpenAIEngine.scoring_method` with its reason):

- ``"full-label"`` (vLLM, SGLang: ``prompt_logprobs``): each option is sent as the closed
  assistant turn answering the question (``add_generation_prompt: false``), and the server
  returns every prompt token's log-probability. An option's tokens are those after the
  generation prompt (one more request, the open turn, says where it ends) up to and including
  the template's end of turn, as in process; they are summed or averaged by
  ``option_scoring`` as in process, so the same weights give the same scores.
- ``"first-token"`` (only where ``OPENAI_SCORING=first-token`` asks for it, on a server with prompt
  log-probabilities): one request per image, each option scored by the log-probability of its
  first answer token (``top_logprobs``; the token ids each option starts with are learnt from one
  full-label pass, and the strategy is used only where they are distinct). An approximation: an
  option's later tokens and the end of turn are not scored. About ``n_options + 1`` times fewer
  requests than full-label.
- ``"letters"`` (servers with ``top_logprobs`` only, e.g. hosted APIs, and only where the
  question lists its options by letter, ``mllmMode="multiple-choice"``): each letter's
  log-probability as the first answer token; letters outside the top list share the
  probability mass the list leaves over. Closed questions are never lettered behind the
  user's back: the model is asked what the user configured.
- ``"agreement"`` (servers that return no log-probabilities, e.g. ``transformers serve``):
  the question is asked ``samples`` times (the first greedy, the rest at temperature 1)
  and an option's probability is its share of the answers, smoothed:
  ``(count + 0.5) / (samples + 0.5 · n_options)``. An answer that names no option is mapped
  to the nearest label by text embeddings when a mapper is given (and counts for none if
  nothing is similar enough), so a model that never answers inside the label set gets the uniform distribution:
  maximal doubt. A server that ignores temperature makes every sample the same; the score
  then says only whether the model answered inside the label set.
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
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import requests
from PIL import Image

from backend import deadline
from backend.models.engine import EngineError, EngineUnavailable, Generation, OptionScores, OptionScoring, normalise
from backend.prompts import LETTERS

log = logging.getLogger(__name__)

SMOOTHING = 0.5
MAX_IMAGE_SIDE = 2048
TOP_LOGPROBS = 20
RETRY_STATUSES = {429, 500, 502, 503, 504}
COOLDOWN_SECONDS = 10.0
_EXTENSIONS = ("prompt_logprobs", "add_generation_prompt", "continue_final_message")  # vLLM's and SGLang's
Token = tuple[int, float, str]  # (id, log-probability given what precedes it, text)


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
        option_scoring: OptionScoring = "mean",
        scoring: str = "full-label",
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
        self.option_scoring = option_scoring
        self.scoring = scoring  # "full-label", or "first-token" (the approximation, asked for)
        self._first_tokens: OrderedDict[tuple[str, ...], tuple[int, ...] | None] = OrderedDict()
        self._prompt_logprobs: bool | None = None  # None: not probed yet
        self._has_logprobs: bool | None = None
        self.scoring_method = "not probed yet"
        self.scoring_reason = "no question asked yet"
        self._down_until = 0.0
        self._down_reason = ""
        self._lock = threading.Lock()
        self.requests_sent = 0
        self.tokens_processed = 0  # as the server reports them in "usage"

    def __repr__(self) -> str:
        return f"OpenAIEngine({self.base_url!r}, model={self.model!r})"

    @property
    def forward_passes(self) -> int:
        """One prefill per request (what a request with ``max_tokens=1`` costs the server; decode steps of longer
        answers are not counted)."""
        return self.requests_sent

    # --- HTTP ---------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def chat(self, image: Image.Image | str, text: str, **options: Any) -> dict:
        """One chat completion about one image (or its data URL, encoded once for several questions)."""
        return self.complete([_question(image, text)], **options)

    def complete(self, messages: list[dict], **options: Any) -> dict:
        """One chat completion of ``messages``, with retries on 429/5xx and connection errors."""
        self._check_cooldown()
        body = {"model": self.model, "messages": messages, "stream": False, **options}
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
        if response.status_code == 400 and "context length" in response.text:  # vLLM's and SGLang's wording
            raise EngineError(
                f"the question is longer than the model server's context ({self._context_length()} tokens: "
                "max_model_len in its /v1/models); serve the model with a larger --max-model-len (vLLM; "
                "--context-length for SGLang), or ask about fewer labels at once"
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

    def _context_length(self) -> str:
        """The served model's ``max_model_len`` as ``/v1/models`` lists it (vLLM, SGLang), or "unknown"."""
        try:
            listed = self.session.get(f"{self.base_url}/models", headers=self._headers(), timeout=5).json()["data"]
            return str(next(int(m["max_model_len"]) for m in listed if m.get("id") == self.model))
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

    # --- the Engine interface ----------------------------------------------------------

    def score_options(self, images: Sequence[Image.Image], prompt: str, options: Sequence[str]) -> OptionScores:
        if not options:
            raise EngineError("no options to score")
        urls = [image_data_url(image) for image in images]  # once: every option and sample sends the same image
        if self.scoring == "first-token" and self._prompt_logprobs is not False and urls:
            firsts = self._first_token_ids(urls[0], prompt, options)
            if firsts is not None:
                self.scoring_method = "first-token"
                rows = self._map(lambda url: self._first_token_row(url, prompt, firsts), urls)
                return OptionScores(options=tuple(options), logprobs=np.vstack(rows), mapped=np.zeros(len(urls)))
        heads = self._open_turns(urls, prompt) if self._prompt_logprobs is not False else None
        if heads is not None:
            self.scoring_method = "full-label"
            logprobs = self._full_label(urls, prompt, options, heads)
            return OptionScores(options=tuple(options), logprobs=logprobs, mapped=np.zeros(len(urls)))
        rows = list(self._pool.map(deadline.carry(lambda url: self._score_sampled(url, prompt, options)), urls))
        logprobs = np.vstack([row for row, _ in rows]) if rows else np.empty((0, len(options)))
        return OptionScores(options=tuple(options), logprobs=logprobs, mapped=np.array([m for _, m in rows]))

    # --- full-label: prompt log-probabilities of each closed answer turn ------------------

    def _prompt_tokens(self, messages: list[dict], *, closed: bool) -> list[Token] | None:
        """The conversation's tokens with their log-probabilities, as the server's template renders it: closed (the
        last message is the answer, its end of turn included) or open (ending in the generation prompt)."""
        payload = self.complete(messages, max_tokens=1, temperature=0, prompt_logprobs=0,
                                add_generation_prompt=not closed, continue_final_message=False)  # fmt: skip
        return _read_prompt_logprobs(payload)

    def _open_turns(self, urls: list[str], prompt: str) -> list[list[Token]] | None:
        """Each image's question up to the generation prompt, or None where the server gives no prompt
        log-probabilities (found out on the first question, then remembered)."""
        if not urls:
            return []
        if self._prompt_logprobs is None:  # the probe: the first image's open turn
            try:
                first = self._prompt_tokens([_question(urls[0], prompt)], closed=False)
            except EngineError as exc:
                if isinstance(exc, EngineUnavailable) or not any(name in str(exc) for name in _EXTENSIONS):
                    raise
                first = None  # the server refused the extension by name: it does not have it
            self._prompt_logprobs = first is not None
            if first is None:
                self.scoring_reason = f"the model server at {self.base_url} returns no prompt log-probabilities"
                log.warning("%s: closed questions are scored by sampling agreement", self.scoring_reason)
                return None
            self.scoring_reason = "the server returns prompt log-probabilities: every label is scored in full"
            rest = self._map(lambda url: self._prompt_tokens([_question(url, prompt)], closed=False), urls[1:])
            return [first, *rest]
        heads = self._map(lambda url: self._prompt_tokens([_question(url, prompt)], closed=False), urls)
        if any(head is None for head in heads):
            raise EngineError(f"the model server at {self.base_url} stopped returning prompt log-probabilities")
        return heads

    def _full_label(self, urls: list[str], prompt: str, options: Sequence[str], heads: list) -> np.ndarray:
        pairs = [(i, j) for i in range(len(urls)) for j in range(len(options))]

        def turn(pair: tuple[int, int]) -> list[Token] | None:
            answer = {"role": "assistant", "content": options[pair[1]]}
            return self._prompt_tokens([_question(urls[pair[0]], prompt), answer], closed=True)

        summed = np.zeros((len(urls), len(options)))
        counts = np.zeros((len(urls), len(options)), dtype=int)
        for (i, j), tokens in zip(pairs, self._map(turn, pairs), strict=True):
            if tokens is None:
                raise EngineError(f"the model server at {self.base_url} stopped returning prompt log-probabilities")
            answer = answer_tokens(heads[i], tokens)
            summed[i, j], counts[i, j] = sum(logprob for _, logprob, _ in answer), len(answer)
        rows = [normalise(summed[i : i + 1], counts[i], self.option_scoring) for i in range(len(urls))]  # type: ignore[arg-type]
        return np.vstack(rows) if rows else np.empty((0, len(options)))

    # --- first-token: one request per image, each option's first answer token ---------

    def _first_token_ids(self, url: str, prompt: str, options: Sequence[str]) -> tuple[int, ...] | None:
        """The token each option's answer starts with, learnt once per label set from one image's closed turns;
        None where two options start alike (or the server has no prompt log-probabilities): full-label then."""
        key = tuple(options)
        if key not in self._first_tokens:
            heads = self._open_turns([url], prompt)
            if heads is None:
                return None
            turns = self._map(lambda option: self._prompt_tokens(
                [_question(url, prompt), {"role": "assistant", "content": option}], closed=True), options)  # fmt: skip
            firsts = tuple(answer_tokens(heads[0], turn)[0][0] for turn in turns if turn)
            distinct = len(firsts) == len(options) and len(set(firsts)) == len(firsts)
            self._first_tokens[key] = firsts if distinct else None
            while len(self._first_tokens) > 256:
                self._first_tokens.popitem(last=False)
            if not distinct:
                self.scoring_reason = "OPENAI_SCORING=first-token, but two labels start with the same token"
        return self._first_tokens[key]

    def _first_token_row(self, url: str, prompt: str, firsts: tuple[int, ...]) -> np.ndarray:
        payload = self.chat(url, prompt, max_tokens=1, temperature=0, logprobs=True, top_logprobs=TOP_LOGPROBS,
                            return_tokens_as_token_ids=True)  # vLLM's extension: "token_id:375"  # fmt: skip
        listed = _first_position(payload)
        if listed is None:
            raise EngineError(f"the model server at {self.base_url} returned no top log-probabilities")
        scores = _share_unlisted([(_token_id(token), logprob) for token, logprob in listed], list(firsts))
        self.scoring_reason = ("OPENAI_SCORING=first-token: each label's first answer token (an approximation: "
                               "its later tokens and the end of turn are not scored)")  # fmt: skip
        return scores

    def _map(self, function: Callable, items: Sequence) -> list:
        return list(self._pool.map(deadline.carry(function), items))

    # --- letters and agreement: what servers without prompt log-probabilities allow ------

    def _score_sampled(self, image_url: str, question: str, options: Sequence[str]) -> tuple[np.ndarray, float]:
        """Scores for one image, and the share of its answers that were mapped from out-of-set text."""
        lettered = tuple(options) == LETTERS[: len(options)]  # multiple-choice: the question lists them by letter
        if lettered and self._has_logprobs is not False:
            first = self.chat(
                image_url, question, max_tokens=4, temperature=0, logprobs=True, top_logprobs=TOP_LOGPROBS
            )
            scores = _letter_logprobs(first, len(options))
            if scores is not None:
                self._has_logprobs = True
                self.scoring_method = "letters"
                return scores, 0.0
            self._has_logprobs = False
            answers = [_content(first)]
        else:
            answers = [_content(self.chat(image_url, question, max_tokens=32, temperature=0))]
        self.scoring_method = "agreement"
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


def _question(image: Image.Image | str, text: str) -> dict:
    url = image if isinstance(image, str) else image_data_url(image)
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
    }


def _read_prompt_logprobs(payload: dict) -> list[Token] | None:
    """vLLM's and SGLang's ``prompt_logprobs`` (one entry per prompt token, the first None; with ``0``, each entry
    holds just that token) as (id, log-probability, text), or None when the server sent none."""
    entries = payload.get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) < 2:
        return None
    tokens: list[Token] = []
    try:
        for entry in entries:
            if entry is None:
                tokens.append((-1, 0.0, ""))
                continue
            ranked = sorted(entry.items(), key=lambda item: item[1].get("rank") or 0)
            token_id, info = max(ranked, key=lambda item: item[1].get("rank") or 0)  # the prompt's own token
            tokens.append((int(token_id), float(info["logprob"]), str(info.get("decoded_token") or "")))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return tokens


def answer_tokens(head: Sequence[Token], turn: Sequence[Token]) -> list[Token]:
    """The answer's tokens in a closed turn: after the open turn ``head`` (the generation prompt), up to and including
    the template's end of turn, i.e. the last token that is not blank (a newline between turns is not the answer's).
    Where the tokenizer merged the generation prompt with the answer's first token, the answer starts where the two
    renderings part."""
    start = 0
    while start < min(len(head), len(turn)) and head[start][0] == turn[start][0]:
        start += 1
    end = len(turn)
    while end > start + 1 and not turn[end - 1][2].strip():
        end -= 1
    return list(turn[start:end])


def _content(payload: dict) -> str:
    return str(payload["choices"][0]["message"].get("content") or "")


def _first_position(payload: dict) -> list[tuple[str, float]] | None:
    """(token, log-probability) of the top alternatives at the first non-blank answer token, or None."""
    content = (payload["choices"][0].get("logprobs") or {}).get("content")
    if not content:
        return None
    position = next((t for t in content if str(t.get("token", "")).strip()), None)
    if position is None or not position.get("top_logprobs"):
        return None
    return [(str(candidate["token"]), float(candidate["logprob"])) for candidate in position["top_logprobs"]]


def _share_unlisted(listed: Sequence[tuple[object, float]], keys: Sequence[object]) -> np.ndarray:
    """Each key's log-probability among the listed alternatives (summed where several read as one key); keys that
    are not listed share the probability mass the list leaves over."""
    scores = np.full(len(keys), -np.inf)
    listed_mass = 0.0
    for key, logprob in listed:
        listed_mass += math.exp(logprob)
        if key in keys:
            index = keys.index(key)
            scores[index] = np.logaddexp(scores[index], logprob)
    unlisted = np.isinf(scores)
    if unlisted.any():
        leftover = max(1.0 - listed_mass, 1e-12)
        scores[unlisted] = math.log(leftover / unlisted.sum())
    return scores


def _token_id(token: str) -> int | None:
    return int(token.split(":", 1)[1]) if token.startswith("token_id:") and token[9:].isdigit() else None


def _letter_logprobs(payload: dict, n_options: int) -> np.ndarray | None:
    """Each option letter's log-probability at the first non-blank answer token, or None without logprobs."""
    listed = _first_position(payload)
    if listed is None:
        return None
    letters = [(token.strip().rstrip(".):").lstrip("(").upper(), logprob) for token, logprob in listed]
    return _share_unlisted(letters, list(LETTERS[:n_options]))
