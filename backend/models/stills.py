"""A checkpoint's processor on installs without torchvision: its still-image parts only.

transformers builds every multimodal processor with its video processor, and video processors need
torchvision, which many CPU installs lack (PyPI's torchvision does not import beside the CPU torch 2.13
wheel). So Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL, LLaVA-OneVision, SmolVLM2, GLM-4V and the like
raise ``ImportError`` before serving a single image, though labelling never reads a video. Here the
processor's own class is loaded without its ``video_processor`` attribute: the same image processor,
tokenizer and chat template, and the same ``__call__`` for images.
"""

from __future__ import annotations

import logging
from functools import cache

from transformers import AutoConfig, AutoProcessor
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

log = logging.getLogger(__name__)

_VIDEO = "video_processor"


def load_processor(model_id: str, *, trust_remote_code: bool):
    """``AutoProcessor.from_pretrained``, or, where only the video processor needs a missing torchvision, the
    processor's class without it."""
    try:
        return AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
        processor_class = _processor_class(model_id, trust_remote_code)
        if processor_class is None or _VIDEO not in processor_class.get_attributes():
            raise
        log.info("torchvision is missing: loading %s without its video processor", processor_class.__name__)
        return _without_video(processor_class).from_pretrained(model_id, trust_remote_code=trust_remote_code)


def _processor_class(model_id: str, trust_remote_code: bool) -> type | None:
    config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    try:
        return PROCESSOR_MAPPING[type(config)]
    except KeyError:
        return None


@cache
def _without_video(processor_class: type) -> type:
    """``processor_class`` with no video processor among its parts (it is then neither loaded nor checked)."""

    def get_attributes(cls) -> list[str]:
        return [name for name in processor_class.get_attributes() if name != _VIDEO]

    return type(processor_class.__name__, (processor_class,), {"get_attributes": classmethod(get_attributes)})
