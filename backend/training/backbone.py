"""The downstream classifier's default backbone: the serving model's own vision tower, so nothing is downloaded.

An image-text-to-text checkpoint (LLaVA, and others with a CLIP or SigLIP tower) already holds
an image encoder. It is written once as an image-classification checkpoint (the tower's weights,
a fresh head, the checkpoint's image processor) under ``MODEL_DIR/backbones/``, and the
classifier fine-tunes it like any hub backbone. ``CLASSIFIER_BACKBONE`` still picks another.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# vision tower config type -> (full config class, image-classification class), both from transformers
_TOWERS = {
    "clip_vision_model": ("CLIPConfig", "CLIPForImageClassification"),
    "siglip_vision_model": ("SiglipConfig", "SiglipForImageClassification"),
}


class BackboneError(RuntimeError):
    """No backbone can be made from the serving model; the message says to set CLASSIFIER_BACKBONE."""


def classifier_backbone(*, configured: str | None, serving_model: str, model_dir: Path) -> str:
    """``configured`` when set; else the path of a backbone made from ``serving_model``'s vision tower."""
    if configured:
        return configured
    digest = hashlib.sha256(str(Path(serving_model).resolve()).encode()).hexdigest()[:12]
    out = Path(model_dir) / "backbones" / digest
    if not (out / "config.json").exists():
        _write_tower(serving_model, out)
    return str(out)


def _write_tower(serving_model: str, out: Path) -> None:
    import transformers
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    try:
        model = AutoModelForImageTextToText.from_pretrained(serving_model)
        processor = AutoImageProcessor.from_pretrained(serving_model)
    except Exception as exc:
        raise BackboneError(
            f"cannot read a vision tower from MLLM_MODEL={serving_model} ({type(exc).__name__}); set "
            "CLASSIFIER_BACKBONE to an image backbone (a local path, or a hub id where a hub is reachable)"
        ) from None
    tower = getattr(getattr(model, "model", model), "vision_tower", None)
    kind = getattr(getattr(tower, "config", None), "model_type", None)
    if kind not in _TOWERS:
        raise BackboneError(
            f"MLLM_MODEL={serving_model} has a {kind or 'unknown'} vision tower, which cannot become a classifier "
            f"here (supported: {', '.join(_TOWERS)}); set CLASSIFIER_BACKBONE to an image backbone"
        )
    config_class, classifier_class = (getattr(transformers, name) for name in _TOWERS[kind])
    classifier = classifier_class(config_class(vision_config=tower.config.to_dict(), num_labels=2))
    classifier.vision_model.load_state_dict(tower.state_dict())
    partial = out.with_name(out.name + ".partial")
    classifier.save_pretrained(partial)
    processor.save_pretrained(partial)
    partial.replace(out)  # whole or absent: a concurrent reader never sees half a backbone
