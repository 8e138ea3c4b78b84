"""Every environment variable the backend reads, validated once at start.

A wrong value raises :class:`SettingsError` naming the variable and the fix, so
``mllm-backend serve`` fails at start instead of at the first request.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from backend.annotate.choice import LABEL_MODES
from backend.annotate.tagging import TAG_METHODS
from backend.labelstudio.regions import REGION_VIEWS
from backend.models.providers import PROVIDERS as ENGINE_PROVIDERS
from backend.models.providers import SERVED
from backend.training import TRAINING_LOSSES

PACKAGE_PROMPTS = Path(__file__).resolve().parent / "default_prompts"  # prompts/, also inside an installed wheel
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class SettingsError(ValueError):
    """A configuration value is missing or wrong; the message says which and how to fix it."""


PROVIDERS = tuple(ENGINE_PROVIDERS)
QUANTIZATIONS = ("none", "4bit", "8bit")
OPTION_SCORINGS = ("mean", "sum")
SERVER_SCORINGS = ("full-label", "first-token")  # OPENAI_SCORING: see backend/models/remote.py


@dataclass(frozen=True)
class Settings:
    mllm_model: str
    mllm_provider: str = "transformers"
    mllm_device: str = "auto"
    mllm_batch_size: int = 16
    mllm_option_batch_size: int = 256
    mllm_quantization: str = "none"
    mllm_trust_remote_code: bool = False
    mllm_chat_template: Path | None = None
    mllm_option_scoring: str = "mean"
    mllm_prefix_cache: bool = True
    mllm_image_cache_mb: int = 256
    openai_base_url: str | None = None
    openai_api_key: str | None = field(default=None, repr=False)
    openai_timeout: float = 60.0
    openai_max_retries: int = 3
    openai_concurrency: int = 8
    openai_samples: int = 5
    openai_scoring: str = "full-label"
    label_studio_url: str | None = None
    label_studio_api_key: str | None = field(default=None, repr=False)
    model_dir: Path = Path("model_dir")
    prompts_dir: Path = PACKAGE_PROMPTS
    model_version: str | None = None
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    allowed_media_hosts: tuple[str, ...] = ()
    media_max_bytes: int = 50 * 1024 * 1024
    media_max_pixels: int = 64_000_000
    media_timeout: float = 15.0
    media_cache_bytes: int = 256 * 1024 * 1024
    predict_wait_seconds: float = 60.0
    sync_project_model_version: bool = True
    review_tab: bool = True
    tag_threshold: float = 0.5
    tag_candidate_threshold: float = 0.1
    tag_group_size: int = 10
    tag_method: str = "tagllm"  # one of annotate.tagging.TAG_METHODS
    label_mode: str = "closed"  # one of annotate.choice.LABEL_MODES; a control's mllmMode wins
    option_orders: int = 1  # cyclic orders of a label list averaged over (1: as configured)
    region_view: str = "crop"  # one of REGION_VIEWS: what a region's label question shows; a control's mllmView wins
    box_padding: float = 0.0
    box_min_side: int = 32
    text_encoder: str | None = None
    mapping_min_similarity: float = 0.45
    critic: bool = False  # off by default: on the shapes world it lowered task AUROC on every seed (README)
    critic_provider: str | None = None
    critic_model: str | None = None
    critic_base_url: str | None = None
    calibration_min_reviews: int = 30
    redis_url: str | None = None
    database_url: str | None = field(default=None, repr=False)  # the review store; else SQLite
    job_queue: str = "mllm-backend"
    train_after_annotations: int = 10
    train_debounce_seconds: float = 60.0
    preannotate_chunk_tasks: int = 16
    classifier_backbone: str | None = None  # None: the serving model's own vision tower (training/backbone.py)
    training_epochs: int = 10
    training_loss: str = "weighted"  # one of training.classifier.TRAINING_LOSSES
    training_batch_size: int = 16
    training_learning_rate: float = 1e-4
    cascade: bool = False
    cascade_threshold: float = 0.9
    max_tasks_per_request: int = 200
    max_predicts_in_flight: int = 4
    predict_deadline_seconds: float = 90.0
    predict_max_pixels: int = 64_000_000
    max_labels: int = 1000
    webhook_secret: str | None = field(default=None, repr=False)
    log_level: str = "INFO"

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        if self.basic_auth_user is None or self.basic_auth_pass is None:
            return None
        return self.basic_auth_user, self.basic_auth_pass

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        return _Reader(os.environ if env is None else env).settings()


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = {k: v for k, v in env.items() if v.strip() != ""}

    def text(self, name: str) -> str | None:
        value = self.env.get(name)
        return value.strip() if value is not None else None

    def integer(self, name: str, default: int, minimum: int) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a whole number; set it to an integer ≥ {minimum}") from None
        if value < minimum:
            raise SettingsError(f"{name}={value} is too small; set it to an integer ≥ {minimum}")
        return value

    def number(self, name: str, default: float, minimum: float, maximum: float | None = None) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a number; set it to a number ≥ {minimum}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"≥ {minimum}"
            raise SettingsError(f"{name}={value} is out of range; set it to a number {bound}")
        return value

    def redis_url(self) -> str | None:
        raw = self.text("REDIS_URL")
        if raw is not None and urlsplit(raw).scheme not in {"redis", "rediss", "unix"}:
            raise SettingsError(f"REDIS_URL={raw!r} is not a Redis URL; set it like redis://127.0.0.1:6379/0")
        return raw

    def database_url(self) -> str | None:
        raw = self.text("DATABASE_URL")
        if raw is not None and urlsplit(raw).scheme not in {"postgresql", "postgres"}:
            # not echoed: a database URL usually carries a password
            raise SettingsError("DATABASE_URL is not a PostgreSQL URL; set it like postgresql://user@host:5432/db "
                                "(or unset it to keep the review store in SQLite under MODEL_DIR)")  # fmt: skip
        return raw

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = (self.text(name) or default).lower()
        if value not in allowed:
            raise SettingsError(f"{name}={value!r} is not supported; set it to one of {', '.join(allowed)}")
        return value

    def existing_file(self, name: str) -> Path | None:
        raw = self.text(name)
        if raw is None:
            return None
        if not Path(raw).is_file():
            raise SettingsError(f"{name}={raw!r} is not a file; set it to the path of a Jinja chat template")
        return Path(raw)

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{name}={raw!r} is not a boolean; set it to true or false")

    def url(self, name: str, example: str) -> str | None:
        raw = self.text(name)
        if raw is None:
            return None
        parts = urlsplit(raw)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise SettingsError(f"{name}={raw!r} is not an http(s) URL; set it to an address like {example}")
        return raw.rstrip("/")

    def label_studio(self) -> tuple[str | None, str | None]:
        """(URL, key); HumanSignal's names LABEL_STUDIO_HOST / LABEL_STUDIO_ACCESS_TOKEN are read too.

        The operator's key is sent only to the Label Studio the operator named: a key without
        a URL would otherwise go to whatever host a /setup request names.
        """
        url = self.url("LABEL_STUDIO_URL", example="http://localhost:8080") or self.url(
            "LABEL_STUDIO_HOST", example="http://localhost:8080"
        )
        key = self.text("LABEL_STUDIO_API_KEY") or self.text("LABEL_STUDIO_ACCESS_TOKEN")
        if key is not None and url is None:
            raise SettingsError(
                "LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is not; set LABEL_STUDIO_URL to the Label Studio "
                "this key belongs to (e.g. http://localhost:8080), so the key is never sent anywhere else"
            )
        return url, key

    def settings(self) -> Settings:
        model = self.text("MLLM_MODEL")
        if model is None:
            raise SettingsError(
                "MLLM_MODEL is not set; set it to a Hugging Face hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct) "
                "or a local checkpoint path. Offline, build one with `mllm-backend tiny-model ./models/tiny` "
                "and set MLLM_MODEL=./models/tiny"
            )
        provider = self.choice("MLLM_PROVIDER", "transformers", PROVIDERS)
        openai_url = self.url("OPENAI_BASE_URL", example="http://localhost:8000/v1")
        if provider in SERVED and openai_url is None:
            raise SettingsError(
                f"MLLM_PROVIDER={provider} needs OPENAI_BASE_URL; set it to the server's /v1 address, "
                "e.g. http://localhost:8000/v1 (vLLM) or http://localhost:11434/v1 (Ollama)"
            )
        if (
            self.text("CRITIC_MODEL")
            and (self.text("CRITIC_PROVIDER") or "").lower() in SERVED
            and not (self.text("CRITIC_BASE_URL") or openai_url)
        ):
            raise SettingsError(
                f"CRITIC_PROVIDER={self.text('CRITIC_PROVIDER')} needs CRITIC_BASE_URL (or OPENAI_BASE_URL); set it "
                "to the /v1 address"
            )
        device = (self.text("MLLM_DEVICE") or "auto").lower()
        if not _DEVICE.match(device):
            raise SettingsError(f"MLLM_DEVICE={device!r} is not a device; set it to auto, cpu, cuda, cuda:N or mps")
        user, password = self.text("BASIC_AUTH_USER"), self.text("BASIC_AUTH_PASS")
        if (user is None) != (password is None):
            raise SettingsError(
                "BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together; set both, or neither to disable basic auth"
            )
        prompts_dir = Path(self.text("PROMPTS_DIR") or PACKAGE_PROMPTS)
        if not prompts_dir.is_dir():
            raise SettingsError(
                f"PROMPTS_DIR={str(prompts_dir)!r} is not a directory; set it to the repository's prompts/ folder"
            )
        hosts = tuple(h.strip().lower() for h in (self.text("ALLOWED_MEDIA_HOSTS") or "").split(",") if h.strip())
        for host in hosts:
            if "/" in host or "@" in host:
                raise SettingsError(
                    f"ALLOWED_MEDIA_HOSTS entry {host!r} is not a host; "
                    "set it to hosts as host or host:port, comma-separated"
                )
        label_studio_url, label_studio_key = self.label_studio()
        log_level = (self.text("LOG_LEVEL") or "INFO").upper()
        if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(f"LOG_LEVEL={log_level!r} is not a level; set it to DEBUG, INFO, WARNING or ERROR")
        return Settings(
            mllm_model=model,
            mllm_provider=provider,
            mllm_device=device,
            mllm_batch_size=self.integer("MLLM_BATCH_SIZE", 16, 1),
            mllm_option_batch_size=self.integer("MLLM_OPTION_BATCH_SIZE", 256, 1),
            mllm_quantization=self.choice("MLLM_QUANTIZATION", "none", QUANTIZATIONS),
            mllm_trust_remote_code=self.flag("MLLM_TRUST_REMOTE_CODE", False),
            mllm_chat_template=self.existing_file("MLLM_CHAT_TEMPLATE"),
            mllm_option_scoring=self.choice("MLLM_OPTION_SCORING", "mean", OPTION_SCORINGS),
            mllm_prefix_cache=self.flag("MLLM_PREFIX_CACHE", True),
            mllm_image_cache_mb=self.integer("MLLM_IMAGE_CACHE_MB", 256, 0),
            openai_base_url=openai_url,
            openai_api_key=self.text("OPENAI_API_KEY"),
            openai_timeout=self.number("OPENAI_TIMEOUT", 60.0, 0.1),
            openai_max_retries=self.integer("OPENAI_MAX_RETRIES", 3, 0),
            openai_concurrency=self.integer("OPENAI_CONCURRENCY", 8, 1),
            openai_samples=self.integer("OPENAI_SAMPLES", 5, 1),
            openai_scoring=self.choice("OPENAI_SCORING", "full-label", SERVER_SCORINGS),
            label_studio_url=label_studio_url,
            label_studio_api_key=label_studio_key,
            model_dir=Path(self.text("MODEL_DIR") or "model_dir"),
            prompts_dir=prompts_dir,
            model_version=self.text("MODEL_VERSION"),
            basic_auth_user=user,
            basic_auth_pass=password,
            allowed_media_hosts=hosts,
            media_max_bytes=self.integer("MEDIA_MAX_BYTES", 50 * 1024 * 1024, 1024),
            media_max_pixels=self.integer("MEDIA_MAX_PIXELS", 64_000_000, 1),
            media_timeout=self.number("MEDIA_TIMEOUT", 15.0, 0.1),
            media_cache_bytes=self.integer("MEDIA_CACHE_BYTES", 256 * 1024 * 1024, 0),
            predict_wait_seconds=self.number("PREDICT_WAIT_SECONDS", 60.0, 0.0),
            sync_project_model_version=self.flag("SYNC_PROJECT_MODEL_VERSION", True),
            review_tab=self.flag("REVIEW_TAB", True),
            tag_threshold=self.number("TAG_THRESHOLD", 0.5, 0.0, 1.0),
            tag_candidate_threshold=self.number("TAG_CANDIDATE_THRESHOLD", 0.1, 0.0, 1.0),
            tag_group_size=self.integer("TAG_GROUP_SIZE", 10, 1),
            tag_method=self.choice("TAG_METHOD", "tagllm", TAG_METHODS),
            label_mode=self.choice("LABEL_MODE", "closed", LABEL_MODES),
            option_orders=self.integer("OPTION_ORDERS", 1, 1),
            region_view=self.choice("REGION_VIEW", "crop", REGION_VIEWS),
            box_padding=self.number("BOX_PADDING", 0.0, 0.0, 10.0),
            box_min_side=self.integer("BOX_MIN_SIDE", 32, 1),
            text_encoder=self.text("TEXT_ENCODER"),
            mapping_min_similarity=self.number("MAPPING_MIN_SIMILARITY", 0.45, -1.0, 1.0),
            critic=self.flag("CRITIC", False),
            critic_provider=self.choice("CRITIC_PROVIDER", provider, PROVIDERS) if self.text("CRITIC_MODEL") else None,
            critic_model=self.text("CRITIC_MODEL"),
            critic_base_url=self.url("CRITIC_BASE_URL", example="http://localhost:8001/v1") or openai_url,
            calibration_min_reviews=self.integer("CALIBRATION_MIN_REVIEWS", 30, 2),
            redis_url=self.redis_url(),
            database_url=self.database_url(),
            job_queue=self.text("JOB_QUEUE") or "mllm-backend",
            train_after_annotations=self.integer("TRAIN_AFTER_ANNOTATIONS", 10, 1),
            train_debounce_seconds=self.number("TRAIN_DEBOUNCE_SECONDS", 60.0, 0.0),
            preannotate_chunk_tasks=self.integer("PREANNOTATE_CHUNK_TASKS", 16, 1),
            classifier_backbone=self.text("CLASSIFIER_BACKBONE"),
            training_epochs=self.integer("TRAINING_EPOCHS", 10, 1),
            training_loss=self.choice("TRAINING_LOSS", "weighted", TRAINING_LOSSES),
            training_batch_size=self.integer("TRAINING_BATCH_SIZE", 16, 1),
            training_learning_rate=self.number("TRAINING_LEARNING_RATE", 1e-4, 1e-8, 1.0),
            cascade=self.flag("CASCADE", False),
            cascade_threshold=self.number("CASCADE_THRESHOLD", 0.9, 0.0, 1.0),
            max_tasks_per_request=self.integer("MAX_TASKS_PER_REQUEST", 200, 1),
            max_predicts_in_flight=self.integer("MAX_PREDICTS_IN_FLIGHT", 4, 1),
            predict_deadline_seconds=self.number("PREDICT_DEADLINE_SECONDS", 90.0, 1.0),
            predict_max_pixels=self.integer("PREDICT_MAX_PIXELS", 64_000_000, 1024),
            max_labels=self.integer("MAX_LABELS", 1000, 2),
            webhook_secret=self.text("WEBHOOK_SECRET"),
            log_level=log_level,
        )
