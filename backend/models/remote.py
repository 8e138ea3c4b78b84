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

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import requests
from PIL import Image

from backend.models import wire
from backend.models.engine import EngineError, EngineUnavailable, Generation, OptionScores, OptionScoring, normalise
from backend.models.strategies import (
    agreement_logprobs,
    answer_tokens,
    letter_logprobs,
    match_answer,
    share_unlisted,
)
from backend.models.transport import COOLDOWN_SECONDS, ServerTransport
from backend.models.wire import Token, image_data_url
from backend.prompts import LETTERS

log = logging.getLogger(__name__)

TOP_LOGPROBS = 20
FIRST_TOKEN_REASON = ("OPENAI_SCORING=first-token: each label's first answer token (an approximation: its later "
                      "tokens and the end of turn are not scored)")  # fmt: skip


class OpenAIEngine:
    """The engine of an OpenAI-compatible server: picks a scoring strategy from what the server offers (above)
    and asks through a :class:`ServerTransport`."""

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
        self.transport = ServerTransport(base_url, api_key=api_key, timeout=timeout, max_retries=max_retries,
                                         concurrency=concurrency, session=session, cooldown=cooldown)  # fmt: skip
        self.samples = samples
        self.map_answer = map_answer
        self.option_scoring = option_scoring
        self.scoring = scoring  # "full-label", or "first-token" (the approximation, asked for)
        self._first_tokens: OrderedDict[tuple[str, ...], tuple[int, ...] | None] = OrderedDict()
        self._prompt_logprobs: bool | None = None  # None: not probed yet
        self._top_logprobs: bool | None = None
        self.scoring_method = "not probed yet"
        self.scoring_reason = "no question asked yet"

    def __repr__(self) -> str:
        return f"OpenAIEngine({self.base_url!r}, model={self.model!r})"

    @property
    def base_url(self) -> str:
        return self.transport.base_url

    @property
    def session(self) -> requests.Session:
        return self.transport.session

    @property
    def requests_sent(self) -> int:
        return self.transport.requests_sent

    @property
    def tokens_processed(self) -> int:
        return self.transport.tokens_processed

    @property
    def forward_passes(self) -> int:
        """One prefill per request (what a request with ``max_tokens=1`` costs the server; decode steps of longer
        answers are not counted)."""
        return self.transport.requests_sent

    def chat(self, image: Image.Image | str, text: str, **options: Any) -> dict:
        """One chat completion about one image (or its data URL, encoded once for several questions)."""
        return self.complete([wire.question(image, text)], **options)

    def complete(self, messages: list[dict], **options: Any) -> dict:
        return self.transport.complete({"model": self.model, "messages": messages, "stream": False, **options})

    # --- the Engine interface ----------------------------------------------------------

    def score_options(self, images: Sequence[Image.Image], prompt: str, options: Sequence[str]) -> OptionScores:
        if not options:
            raise EngineError("no options to score")
        urls = [image_data_url(image) for image in images]  # once: every option and sample sends the same image
        if self.scoring == "first-token" and self._prompt_logprobs is not False and urls:
            firsts = self._first_token_ids(urls[0], prompt, options)
            if firsts is not None:
                self.scoring_method, self.scoring_reason = "first-token", FIRST_TOKEN_REASON
                rows = self.transport.map(lambda url: self._first_token_row(url, prompt, firsts), urls)
                return OptionScores(options=tuple(options), logprobs=np.vstack(rows), mapped=np.zeros(len(urls)))
        heads = self._open_turns(urls, prompt) if self._prompt_logprobs is not False else None
        if heads is not None:
            self.scoring_method = "full-label"
            logprobs = self._full_label(urls, prompt, options, heads)
            return OptionScores(options=tuple(options), logprobs=logprobs, mapped=np.zeros(len(urls)))
        rows = self.transport.map(lambda url: self._score_sampled(url, prompt, options), urls)
        logprobs = np.vstack([row for row, _ in rows]) if rows else np.empty((0, len(options)))
        return OptionScores(options=tuple(options), logprobs=logprobs, mapped=np.array([m for _, m in rows]))

    def generate(self, images: Sequence[Image.Image], prompt: str, max_new_tokens: int = 32) -> list[Generation]:
        def one(image: Image.Image) -> Generation:
            payload = self.chat(image, prompt, max_tokens=max_new_tokens, temperature=0, logprobs=True)
            return Generation(wire.content(payload).strip(), wire.answer_logprobs(payload))

        return self.transport.map(one, images)

    # --- full-label: prompt log-probabilities of each closed answer turn ------------------

    def _prompt_tokens(self, messages: list[dict], *, closed: bool) -> list[Token] | None:
        return wire.prompt_logprobs(self.complete(messages, **wire.prompt_tokens_request(closed=closed)))

    def _open_turn(self, url: str, prompt: str) -> list[Token] | None:
        return self._prompt_tokens([wire.question(url, prompt)], closed=False)

    def _closed_turn(self, url: str, prompt: str, option: str) -> list[Token] | None:
        return self._prompt_tokens([wire.question(url, prompt), wire.answer(option)], closed=True)

    def _open_turns(self, urls: list[str], prompt: str) -> list[list[Token]] | None:
        """Each image's question up to the generation prompt, or None where the server gives no prompt
        log-probabilities (found out on the first question, then remembered)."""
        if not urls:
            return []
        if self._prompt_logprobs is None:  # the probe: the first image's open turn
            try:
                first = self._open_turn(urls[0], prompt)
            except EngineError as exc:
                if isinstance(exc, EngineUnavailable) or not any(name in str(exc) for name in wire.EXTENSIONS):
                    raise
                first = None  # the server refused the extension by name: it does not have it
            self._prompt_logprobs = first is not None
            if first is None:
                self.scoring_reason = f"the model server at {self.base_url} returns no prompt log-probabilities"
                log.warning("%s: closed questions are scored by sampling agreement", self.scoring_reason)
                return None
            self.scoring_reason = "the server returns prompt log-probabilities: every label is scored in full"
            return [first, *self._checked(self.transport.map(lambda url: self._open_turn(url, prompt), urls[1:]))]
        return self._checked(self.transport.map(lambda url: self._open_turn(url, prompt), urls))

    def _checked(self, turns: list[list[Token] | None]) -> list[list[Token]]:
        if any(turn is None for turn in turns):
            raise EngineError(f"the model server at {self.base_url} stopped returning prompt log-probabilities")
        return turns  # type: ignore[return-value]

    def _full_label(self, urls: list[str], prompt: str, options: Sequence[str], heads: list) -> np.ndarray:
        pairs = [(i, j) for i in range(len(urls)) for j in range(len(options))]
        turns = self._checked(self.transport.map(lambda p: self._closed_turn(urls[p[0]], prompt, options[p[1]]), pairs))
        summed = np.zeros((len(urls), len(options)))
        counts = np.zeros((len(urls), len(options)), dtype=int)
        for (i, j), tokens in zip(pairs, turns, strict=True):
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
            turns = self._checked(self.transport.map(lambda option: self._closed_turn(url, prompt, option), options))
            firsts = tuple(answer_tokens(heads[0], turn)[0][0] for turn in turns)
            distinct = len(set(firsts)) == len(firsts)
            self._first_tokens[key] = firsts if distinct else None
            while len(self._first_tokens) > 256:
                self._first_tokens.popitem(last=False)
            if not distinct:
                self.scoring_reason = "OPENAI_SCORING=first-token, but two labels start with the same token"
        return self._first_tokens[key]

    def _first_token_row(self, url: str, prompt: str, firsts: tuple[int, ...]) -> np.ndarray:
        payload = self.chat(url, prompt, max_tokens=1, temperature=0, logprobs=True, top_logprobs=TOP_LOGPROBS,
                            return_tokens_as_token_ids=True)  # vLLM's extension: "token_id:375"  # fmt: skip
        listed = wire.first_answer_alternatives(payload)
        if listed is None:
            raise EngineError(f"the model server at {self.base_url} returned no top log-probabilities")
        return share_unlisted([(wire.token_id(token), logprob) for token, logprob in listed], list(firsts))

    # --- letters and agreement: what servers without prompt log-probabilities allow ------

    def _score_sampled(self, image_url: str, question: str, options: Sequence[str]) -> tuple[np.ndarray, float]:
        """Scores for one image, and the share of its answers that were mapped from out-of-set text."""
        lettered = tuple(options) == LETTERS[: len(options)]  # multiple-choice: the question lists them by letter
        if lettered and self._top_logprobs is not False:
            first = self.chat(
                image_url, question, max_tokens=4, temperature=0, logprobs=True, top_logprobs=TOP_LOGPROBS
            )
            listed = wire.first_answer_alternatives(first)
            self._top_logprobs = listed is not None
            if listed is not None:
                self.scoring_method = "letters"
                return letter_logprobs(listed, len(options)), 0.0
            answers = [wire.content(first)]
        else:
            answers = [wire.content(self.chat(image_url, question, max_tokens=32, temperature=0))]
        self.scoring_method = "agreement"
        answers += [
            wire.content(self.chat(image_url, question, max_tokens=32, temperature=1.0, seed=seed))
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
        return agreement_logprobs(counts, len(answers)), mapped / len(answers)
