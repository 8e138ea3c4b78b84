"""Builds the backend's parts from settings, once per process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from backend.labelstudio.client import LabelStudioSites, ModelVersionSync
from backend.labelstudio.media import ImageLoader, MediaLimits
from backend.metrics import Metrics
from backend.models.engine import Engine
from backend.models.slot import EngineSlot
from backend.predictor import Predictor
from backend.prompts import PromptBook
from backend.settings import Settings


@dataclass
class Service:
    settings: Settings
    slot: EngineSlot
    predictor: Predictor
    sites: LabelStudioSites
    version_sync: ModelVersionSync
    metrics: Metrics


def local_engine_factory(settings: Settings) -> Callable[[], Engine]:
    def load() -> Engine:
        from backend.models.local import TransformersEngine  # torch import is slow: only in the loader

        return TransformersEngine(settings.mllm_model, settings.mllm_device, settings.mllm_batch_size)

    return load


def build_service(settings: Settings, engine_factory: Callable[[], Engine] | None = None) -> Service:
    prompts = PromptBook(settings.prompts_dir)
    prompts.check()
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics()
    slot = EngineSlot(engine_factory or local_engine_factory(settings), settings.mllm_model)
    sites = LabelStudioSites(settings.label_studio_url, settings.label_studio_api_key)
    limits = MediaLimits(
        max_bytes=settings.media_max_bytes,
        max_pixels=settings.media_max_pixels,
        timeout=settings.media_timeout,
        allowed_hosts=settings.allowed_media_hosts,
    )
    loader = ImageLoader(limits, cache_bytes=settings.media_cache_bytes)
    predictor = Predictor(settings, slot, loader, prompts, sites, metrics)
    return Service(
        settings, slot, predictor, sites, ModelVersionSync(sites, settings.sync_project_model_version), metrics
    )
