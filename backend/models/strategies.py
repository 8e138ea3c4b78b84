"""How answers become option scores, whatever the provider: pure functions over tokens and answers.

- full-label: an option's own tokens in a closed answer turn (:func:`answer_tokens`);
- first-token and letters: one position's top alternatives (:func:`share_unlisted`, :func:`letter_logprobs`);
- agreement: shares of sampled answers (:func:`match_answer`, :func:`agreement_logprobs`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from backend.models.wire import Token
from backend.prompts import LETTERS

SMOOTHING = 0.5


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


def share_unlisted(listed: Sequence[tuple[object, float]], keys: Sequence[object]) -> np.ndarray:
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


def letter_logprobs(listed: Sequence[tuple[str, float]], n_options: int) -> np.ndarray:
    """Each option letter's log-probability among the first answer token's alternatives ("B", " b", "(B" alike)."""
    letters = [(token.strip().rstrip(".):").lstrip("(").upper(), logprob) for token, logprob in listed]
    return share_unlisted(letters, list(LETTERS[:n_options]))


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


def agreement_logprobs(counts: np.ndarray, answers: int) -> np.ndarray:
    """Smoothed shares of ``answers`` sampled answers: ``(count + 0.5) / (answers + 0.5 · n_options)``."""
    return np.log((counts + SMOOTHING) / (answers + SMOOTHING * len(counts)))
