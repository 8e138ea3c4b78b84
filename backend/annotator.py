"""The Python API: Label Studio tasks and a label config in, the predictions ``/predict`` would answer out.

    from backend import Annotator

    annotator = Annotator(model="backend/shapes/model")
    predictions = annotator.predict(tasks, label_config)

No server, no SQLite file, no background thread: the model loads in the constructor, and
``predict`` runs in the caller's thread. The HTTP app and the queue jobs use the same
:class:`~backend.predictor.Predictor`; what they add (calibration from review outcomes,
the project's trained classifier, metrics) is passed in here only when you want it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backend.annotate.mapping import LabelMapper
from backend.labelstudio.client import LabelStudioSites
from backend.models.engine import Engine
from backend.models.slot import EngineSlot
from backend.models.text_encoder import SentenceEncoder
from backend.predictor import Answer, Predictor
from backend.prompts import PromptBook
from backend.reviews import ReviewStore
from backend.settings import Settings
from backend.telemetry import Telemetry
from backend.training.versions import ClassifierVersions


class Annotator:
    """An MLLM annotating Label Studio tasks.

    Args:
        model: a local checkpoint directory or hub id (``MLLM_MODEL``), or the model name an
            OpenAI-compatible server serves when ``base_url`` is given.
        base_url: an OpenAI-compatible server's ``/v1`` address (vLLM, SGLang, Ollama, ...).
        prompts: a prompts directory (default: the package's ``prompts/``).
        engine: an :class:`~backend.models.engine.Engine` you built yourself, instead of ``model``.
        settings: any other setting, by its environment name (e.g. ``{"CRITIC": "on"}``); the
            process environment is not read.
        reviews: a :class:`~backend.reviews.ReviewStore` whose review outcomes calibrate scores.
        classifiers: a :class:`~backend.training.versions.ClassifierVersions` of trained classifiers
            (agreement signal, ``CASCADE``).
    """

    def __init__(
        self,
        *,
        model: str | Path | None = None,
        base_url: str | None = None,
        prompts: str | Path | None = None,
        engine: Engine | None = None,
        settings: Mapping[str, str] | None = None,
        reviews: ReviewStore | None = None,
        classifiers: ClassifierVersions | None = None,
    ) -> None:
        if model is None and engine is None:
            raise ValueError("Annotator needs model= (a checkpoint, hub id or served model name) or engine=")
        env = {"MLLM_MODEL": str(model or getattr(engine, "name", "engine")), **(settings or {})}
        if base_url is not None:
            env |= {"MLLM_PROVIDER": "openai", "OPENAI_BASE_URL": base_url}
        if prompts is not None:
            env["PROMPTS_DIR"] = str(prompts)
        self.settings = Settings.from_env(env)
        book = PromptBook(self.settings.prompts_dir)
        book.check()
        mapper = LabelMapper(SentenceEncoder(self.settings.text_encoder), self.settings.mapping_min_similarity)
        if engine is None:
            from backend.service import engine_factory

            engine = engine_factory(self.settings, mapper)()
        critic = None
        if self.settings.critic and self.settings.critic_model:
            from backend.service import engine_factory

            s = self.settings
            built = engine_factory(s, mapper, s.critic_provider, s.critic_model, s.critic_base_url)()
            critic = EngineSlot.holding(built, f"{s.critic_model} (critic)")
        from backend.service import image_loader

        self._predictor = Predictor(
            self.settings,
            EngineSlot.holding(engine, self.settings.mllm_model),
            image_loader(self.settings),
            book,
            LabelStudioSites(self.settings.label_studio_url, self.settings.label_studio_api_key),
            Telemetry(),
            reviews,
            mapper,
            critic,
            classifiers,
        )

    @classmethod
    def serving(cls, predictor: Predictor) -> Annotator:
        """The annotator of a running service (``mllm-backend serve``, the queue's workers): its predictor, with
        the model loading in the background, the project's calibration and classifiers, and its telemetry."""
        annotator = cls.__new__(cls)
        annotator.settings, annotator._predictor = predictor.settings, predictor
        return annotator

    @property
    def model_version(self) -> str:
        """What every prediction is stamped with: changes with the model, the prompts and the scoring settings."""
        return self._predictor.model_version()

    def predict(
        self, tasks: list[Any], label_config: object, *, project: int | str | None = None, context: dict | None = None
    ) -> list[dict | list]:
        """One prediction per task, in order, exactly as ``/predict`` answers it.

        Each is ``{"model_version", "score", "score_meaning", "result": [...]}``; a task that
        cannot be annotated gets ``{"model_version", "error": "..."}`` and never stops the others;
        ``[]`` means there was nothing to annotate (no regions drawn yet). ``project`` (a Label
        Studio project id, or the "<id>.<timestamp>" Label Studio sends) selects the calibration and
        classifier of that project when ``reviews``/``classifiers`` were given.
        """
        return self._predictor.predict(tasks, label_config, None if project is None else str(project), context)

    def answer(
        self, tasks: list[Any], label_config: object, *, project: int | str | None = None, context: dict | None = None
    ) -> Answer:
        """:meth:`predict`, plus the positions of the tasks a deadline (``backend.deadline``, set by the server)
        left unpredicted: the server hands those to background pre-annotation."""
        return self._predictor.answer(tasks, label_config, None if project is None else str(project), context)
