"""The OpenAI chat-completions wire format, as pure functions: what a request carries and what an answer holds.

Plain ``/chat/completions`` fields, plus the extensions vLLM (and SGLang) add: ``prompt_logprobs``,
``add_generation_prompt``, ``continue_final_message`` and ``return_tokens_as_token_ids``.
"""

from __future__ import annotations

import base64
import io

from PIL import Image

MAX_IMAGE_SIDE = 2048
EXTENSIONS = ("prompt_logprobs", "add_generation_prompt", "continue_final_message")  # named in a server's refusal
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


def question(image: Image.Image | str, text: str) -> dict:
    """The user turn: the image (or its data URL, encoded once for several questions), then the text."""
    url = image if isinstance(image, str) else image_data_url(image)
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
    }


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


def prompt_tokens_request(*, closed: bool) -> dict:
    """Request fields asking for the log-probability of every token of the conversation as the server's template
    renders it: closed (the last message is the answer, its end of turn included) or open (ending in the generation
    prompt)."""
    return {"max_tokens": 1, "temperature": 0, "prompt_logprobs": 0, "add_generation_prompt": not closed,
            "continue_final_message": False}  # fmt: skip


def is_chat_completion(payload: object) -> bool:
    try:
        return isinstance(payload, dict) and isinstance(payload["choices"][0]["message"], dict)
    except (KeyError, IndexError, TypeError):
        return False


def content(payload: dict) -> str:
    return str(payload["choices"][0]["message"].get("content") or "")


def used_tokens(payload: dict) -> int:
    try:
        return int((payload.get("usage") or {}).get("total_tokens") or 0)
    except (TypeError, ValueError):
        return 0


def prompt_logprobs(payload: dict) -> list[Token] | None:
    """``prompt_logprobs`` (one entry per prompt token, the first None; with ``0``, each entry holds just that
    token) as (id, log-probability, text), or None when the server sent none."""
    entries = payload.get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) < 2:
        return None
    tokens: list[Token] = []
    try:
        for entry in entries:
            if entry is None:
                tokens.append((-1, 0.0, ""))
                continue
            token_id, info = max(entry.items(), key=lambda item: item[1].get("rank") or 0)  # the prompt's own token
            tokens.append((int(token_id), float(info["logprob"]), str(info.get("decoded_token") or "")))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return tokens


def first_answer_alternatives(payload: dict) -> list[tuple[str, float]] | None:
    """(token, log-probability) of the top alternatives at the first non-blank answer token, or None."""
    listed = (payload["choices"][0].get("logprobs") or {}).get("content")
    if not listed:
        return None
    position = next((t for t in listed if str(t.get("token", "")).strip()), None)
    if position is None or not position.get("top_logprobs"):
        return None
    return [(str(candidate["token"]), float(candidate["logprob"])) for candidate in position["top_logprobs"]]


def answer_logprobs(payload: dict) -> tuple[float, ...] | None:
    """The generated answer's per-token log-probabilities, or None when the server sent none."""
    listed = (payload["choices"][0].get("logprobs") or {}).get("content")
    return tuple(float(t["logprob"]) for t in listed) if listed else None


def token_id(token: str) -> int | None:
    """The id in vLLM's ``return_tokens_as_token_ids`` spelling, ``token_id:375``."""
    return int(token.split(":", 1)[1]) if token.startswith("token_id:") and token[9:].isdigit() else None
