"""What a checkpoint's chat template writes: the prompt the model reads, and each answer's tokens.

A score is the model's log-probability of an answer's tokens, so those tokens must be the ones the
model was trained to produce after the generation prompt: the answer as the template renders it, up
to and including the template's own end of turn, and nothing the template does not write. Three
ways templates differ are handled here and nowhere else:

- **Who writes BOS.** Gemma 3, Mistral 3 and Llama 4 templates start with ``bos_token``; tokenizing
  their rendering with special tokens again would read ``<bos><bos>``. The rendered text is tokenized
  with special tokens only when the template did not place BOS itself.
- **Where a turn ends.** The end of turn is the first special token the template writes after the
  answer (``<|im_end|>``, ``<end_of_turn>``, ``<|eot|>``, ``</s>``); whitespace it writes after that
  token belongs to the template's layout, not to the answer. A template that closes a turn only by
  opening the next (GLM-4V: ``<|user|>``) is rendered with a following user turn to find it.
- **No end of turn at all.** llava-hf's LLaVA-1.5 template separates turns with a space and no
  token. There the answer ends where generation stops, at the model's end of sequence, and the
  separator space is left out (a model trained on ``Dog</s>`` never writes ``▁`` before ``</s>``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

log = logging.getLogger(__name__)

# A private-use character: no prompt contains it, so it marks where the question's words go.
QUESTION_MARK = "\ue000"


def user_turn(prompt: str) -> list[dict]:
    """One user message: the image, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def _text_user(text: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def _answer_text(prefix: str, full: str, option: str) -> tuple[str, int] | None:
    """What the model writes after the generation prompt, up to the end of ``option``, and where that end is in
    ``full``: the template's own spelling (llava-hf's leading space) where the answer turn continues the generation
    prompt, else the option itself (LLaVA-OneVision renders ``assistant \\n`` in a turn but prompts with
    ``assistant\\n``)."""
    spoken = option if option in full[len(prefix) :] else option.strip()
    if not spoken:
        return None
    start = len(prefix) if full.startswith(prefix) else len(_common_prefix(prefix, full))
    at = full.find(spoken, start)
    if at < 0:
        return None
    said = full[len(prefix) : at + len(spoken)] if full.startswith(prefix) else spoken
    return said, at + len(spoken)


def _common_prefix(a: str, b: str) -> str:
    length = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return a[:length]


@dataclass(frozen=True)
class RenderedAnswer:
    """An answer's tokens, and the text they spell after the generation prompt (for tests and logs)."""

    ids: tuple[int, ...]
    text: str
    ends_with: str  # "template" (its end-of-turn token), "next turn", "end of sequence", or "fallback"


class ChatFormat:
    """A processor's chat template, read once: prompts as text, and answers as the template renders them."""

    def __init__(self, processor, tokenizer) -> None:
        self.processor = processor
        self.tokenizer = tokenizer

    def render(self, messages: list[dict], *, generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def prompt(self, question: str) -> str:
        """The conversation up to where the assistant's answer starts."""
        return self.render(user_turn(question), generation_prompt=True)

    @cached_property
    def add_special_tokens(self) -> bool:
        """Whether tokenizing a rendered conversation should add special tokens: not when the template writes
        BOS itself (the tokenizer would add a second one)."""
        bos = self.tokenizer.bos_token
        return not (bos and self.prompt(QUESTION_MARK).startswith(bos))

    def ids(self, text: str) -> list[int]:
        """Token ids of a rendered conversation (or its head), tokenized once with the right special tokens."""
        return list(self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"])

    @cached_property
    def _specials(self) -> tuple[str, ...]:
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        named = {str(token) for token in self.tokenizer.all_special_tokens}
        named |= {token.content for token in decoder.values() if getattr(token, "special", False)}
        return tuple(sorted((token for token in named if token), key=len, reverse=True))

    def _through_first_special(self, text: str) -> str | None:
        """``text`` up to and including its first special token, or None if it has none."""
        found = [(text.find(token), token) for token in self._specials if token in text]
        if not found:
            return None
        at, token = min(found, key=lambda pair: (pair[0], -len(pair[1])))
        return text[: at + len(token)]

    def answer(self, option: str, *, question: str = "?") -> RenderedAnswer:
        """``option``'s tokens as the template renders an assistant turn answering with it.

        The assistant turn starts after the generation prompt, which closes the user turn, so its tokens do
        not depend on what the user asked: they are worked out once, against a one-character ``question``.
        (Rendering the real prompt for every option cost O(labels²) on a prompt listing 1,000 labels.)
        """
        try:
            rendered = self._render_answer(option, question)
        except Exception:  # a template that cannot render an answer turn (some raise on assistant messages)
            log.debug("the chat template cannot render an answer; scoring the option's own tokens", exc_info=True)
            rendered = None
        if rendered is not None:
            return rendered
        eos = self.tokenizer.eos_token_id
        ids = list(self.tokenizer(option, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
        return RenderedAnswer(tuple(ids), option, "fallback")

    def _render_answer(self, option: str, question: str) -> RenderedAnswer | None:
        asked = user_turn(question)
        prefix = self.render(asked, generation_prompt=True)
        for content in ([{"type": "text", "text": option}], option):  # some templates print an answer's content
            full = self.render([*asked, {"role": "assistant", "content": content}])
            if isinstance(content, list) and str(content) in full:
                continue  # the template printed the list itself (GLM-4V): it takes an answer's content as a string
            found = _answer_text(prefix, full, option)
            if found is not None:
                break
        else:
            return None
        said, end = found
        closing = self._through_first_special(full[end:])
        ends_with = "template"
        if closing is None:
            following = self.render([*asked, {"role": "assistant", "content": content}, _text_user("?")])
            closing = self._through_first_special(following[end:]) if following[:end] == full[:end] else None
            ends_with = "next turn"
        extra: list[int] = []
        if closing is None:
            closing, ends_with = "", "end of sequence"
            eos = self.tokenizer.eos_token_id
            extra = [eos] if eos is not None else []
        prefix_ids, full_ids = self.ids(prefix), self.ids(prefix + said + closing)
        if full_ids[: len(prefix_ids)] != prefix_ids or len(full_ids) == len(prefix_ids):
            return None  # a token spans the end of the generation prompt
        return RenderedAnswer(tuple(full_ids[len(prefix_ids) :] + extra), said + closing, ends_with)

    def image_head(self) -> str | None:
        """The rendered conversation up to where the question's words start, if the image comes first."""
        rendered = self.prompt(QUESTION_MARK)
        head = rendered[: rendered.index(QUESTION_MARK)] if rendered.count(QUESTION_MARK) == 1 else ""
        image_token = getattr(self.processor, "image_token", None)
        return head if image_token and image_token in head else None
