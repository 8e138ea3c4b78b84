"""The providers ``MLLM_PROVIDER`` (and ``CRITIC_PROVIDER``) may name: the one list that settings check names
against and the service builds engines from. A new provider is one function here and one engine module.

Each builder is called once, in the background, and imports its engine module only then (torch is slow to
import, and a server-only deployment need not have it loaded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backend.models.engine import Engine
    from backend.settings import Settings


@dataclass(frozen=True)
class EngineRequest:
    """What to build: the model (a hub id or path, or a served model's name), and its server if it has one."""

    settings: Settings
    model: str
    base_url: str | None
    map_answer: Callable[[str, list[str]], int | None] | None


def _transformers(request: EngineRequest) -> Engine:
    from backend.models.local import TransformersEngine

    settings = request.settings
    return TransformersEngine.load(
        request.model,
        settings.mllm_device,
        quantization=settings.mllm_quantization,  # type: ignore[arg-type]
        batch_size=settings.mllm_batch_size,
        option_scoring=settings.mllm_option_scoring,  # type: ignore[arg-type]
        prefix_cache=settings.mllm_prefix_cache,
        option_batch_size=settings.mllm_option_batch_size,
        image_cache_mb=settings.mllm_image_cache_mb,
        trust_remote_code=settings.mllm_trust_remote_code,
        chat_template=str(settings.mllm_chat_template) if settings.mllm_chat_template else None,
    )


def _openai(request: EngineRequest) -> Engine:
    from backend.models.remote import OpenAIEngine

    settings = request.settings
    assert request.base_url is not None  # Settings require OPENAI_BASE_URL (or CRITIC_BASE_URL) for this provider
    return OpenAIEngine(
        request.base_url,
        request.model,
        api_key=settings.openai_api_key,
        timeout=settings.openai_timeout,
        max_retries=settings.openai_max_retries,
        concurrency=settings.openai_concurrency,
        samples=settings.openai_samples,
        map_answer=request.map_answer,
        option_scoring=settings.mllm_option_scoring,  # type: ignore[arg-type]
        scoring=settings.openai_scoring,
    )


PROVIDERS: dict[str, Callable[[EngineRequest], Engine]] = {"transformers": _transformers, "openai": _openai}
SERVED = frozenset({"openai"})  # the providers that talk to a server (and need its base URL)
