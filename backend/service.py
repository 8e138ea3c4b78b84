"""Builds the backend's parts from settings, once per process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from backend.annotate.mapping import LabelMapper
from backend.annotator import Annotator
from backend.jobs import LocalJobs, RedisJobs, make_queue
from backend.labelstudio.client import LabelStudioSites, ModelVersionSync
from backend.labelstudio.connection import KeyCheck, ProjectSetup
from backend.labelstudio.media import ImageLoader, MediaLimits
from backend.models.engine import Engine
from backend.models.providers import PROVIDERS, EngineRequest
from backend.models.slot import EngineSlot
from backend.models.text_encoder import SentenceEncoder
from backend.predictor import Predictor
from backend.prompts import PromptBook
from backend.reviews import ReviewStore
from backend.settings import Settings
from backend.telemetry import Telemetry
from backend.training.versions import ClassifierVersions


@dataclass
class Service:
    settings: Settings
    slot: EngineSlot
    predictor: Predictor
    annotator: Annotator  # the Python API over ``predictor``: what /predict and pre-annotation call
    sites: LabelStudioSites
    version_sync: ModelVersionSync
    key_check: KeyCheck  # does Label Studio accept LABEL_STUDIO_API_KEY (for /health)
    project_setup: ProjectSetup  # the review tab and the webhook's credentials, per connected project
    telemetry: Telemetry
    jobs: RedisJobs | LocalJobs
    classifiers: ClassifierVersions


def engine_factory(
    settings: Settings,
    mapper: LabelMapper | None = None,
    provider: str | None = None,
    model: str | None = None,
    base_url: str | None = None,
) -> Callable[[], Engine]:
    """How to build an engine (called once, in the background): the annotator by default, or the critic."""
    provider = provider or settings.mllm_provider
    model = model or settings.mllm_model
    base_url = base_url or settings.openai_base_url

    request = EngineRequest(settings, model, base_url, mapper.index if mapper is not None else None)
    build = PROVIDERS[provider]  # Settings checked the name against the same registry
    return lambda: build(request)


def image_loader(settings: Settings, cache: bool = True) -> ImageLoader:
    """The image fetcher with the configured limits (and byte cache, unless ``cache`` is off)."""
    limits = MediaLimits(
        max_bytes=settings.media_max_bytes,
        max_pixels=settings.media_max_pixels,
        timeout=settings.media_timeout,
        allowed_hosts=settings.allowed_media_hosts,
    )
    return ImageLoader(limits, cache_bytes=settings.media_cache_bytes if cache else 0)


def build_service(settings: Settings, factory: Callable[[], Engine] | None = None) -> Service:
    prompts = PromptBook(settings.prompts_dir)
    prompts.check()
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    telemetry = Telemetry()
    mapper = LabelMapper(SentenceEncoder(settings.text_encoder), settings.mapping_min_similarity)
    slot = EngineSlot(factory or engine_factory(settings, mapper), settings.mllm_model)
    sites = LabelStudioSites(settings.label_studio_url, settings.label_studio_api_key)
    loader = image_loader(settings)
    critic_slot = None
    if settings.critic and settings.critic_model:
        critic_factory = engine_factory(
            settings, mapper, settings.critic_provider, settings.critic_model, settings.critic_base_url
        )
        critic_slot = EngineSlot(critic_factory, f"{settings.critic_model} (critic)")
    reviews = ReviewStore.for_settings(settings)
    classifiers = ClassifierVersions(settings.model_dir)  # MODEL_DIR/<project>/<version>/
    predictor = Predictor(settings, slot, loader, prompts, sites, telemetry, reviews, mapper, critic_slot, classifiers)
    annotator = Annotator.serving(predictor)
    jobs = make_queue(settings, lambda: annotator)
    sync = ModelVersionSync(sites, settings.sync_project_model_version)
    key_check = KeyCheck(sites.for_project(None) if settings.label_studio_api_key else None)
    return Service(settings, slot, predictor, annotator, sites, sync, key_check,
                   ProjectSetup(settings, sites), telemetry, jobs, classifiers)  # fmt: skip
