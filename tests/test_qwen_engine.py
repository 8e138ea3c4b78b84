"""Qwen2.5-VL (3-D rotary positions) through the local engine's prefix cache, loaded as a user loads it.

The checkpoint is a tiny random Qwen2.5-VL with the real ``Qwen2VLProcessor`` (real image processor, the
public checkpoint's chat template, and a ``video_processor`` entry, as Qwen/Qwen2.5-VL-7B-Instruct has), read
back through ``TransformersEngine.load``. Its video processor needs torchvision, which does not run beside
torch 2.13 (CPU): the engine loads the processor without it (backend/models/stills.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from backend.devtools.tiny import _sharpen_lm_head, _text_config, _train_tokenizer
from backend.models.local import TransformersEngine
from backend.models.stills import _without_video
from tests.conftest import noise_image
from tests.test_chat_templates import TEMPLATES

MERGE = 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]  # fmt: skip


def build_qwen_checkpoint(path):
    """The processor's files, as the public checkpoint has them; returns the tokenizer (the model needs its ids)."""
    tokenizer = _train_tokenizer(SPECIALS, eos="<|im_end|>", pad="<|endoftext|>")
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    template = (TEMPLATES / "qwen2-vl.jinja").read_text()
    _without_video(Qwen2VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=template).save_pretrained(path)  # fmt: skip
    saved = path / "processor_config.json"
    config = json.loads(saved.read_text())
    config["processor_class"] = "Qwen2VLProcessor"  # what the public checkpoint names, video processor included
    config["video_processor"] = {"video_processor_type": "Qwen2VLVideoProcessor", "merge_size": MERGE,
                                 "patch_size": 14, "temporal_patch_size": 2}  # fmt: skip
    saved.write_text(json.dumps(config))
    return tokenizer


@pytest.fixture(scope="module")
def qwen_engine(tmp_path_factory) -> TransformersEngine:
    path = tmp_path_factory.mktemp("qwen")
    tokenizer = build_qwen_checkpoint(path)
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        out_hidden_size=64,
        patch_size=14,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    text = {
        **_text_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id),
        "num_key_value_heads": 2,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "bos_token_id": None,
    }
    config = Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _sharpen_lm_head(model, 0)
    model.save_pretrained(path)
    engine = TransformersEngine.load(str(path), "cpu", batch_size=4, option_scoring="sum")
    assert type(engine.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(engine.processor).__name__ == "Qwen2_5_VLProcessor" and not hasattr(engine.processor, "video_processor")
    return engine


def test_a_qwen_checkpoint_needs_torchvision_for_autoprocessor_but_the_engine_loads_it(qwen_engine, tmp_path):
    from transformers import AutoProcessor

    build_qwen_checkpoint(tmp_path)
    with pytest.raises(ImportError, match="Torchvision"):  # what every CPU install here met before
        AutoProcessor.from_pretrained(tmp_path)
    answer = qwen_engine.chat.answer("cat")
    assert qwen_engine.tokenizer.convert_ids_to_tokens(list(answer.ids))[-1] == "<|im_end|>"


def test_qwen_scores_equal_a_plain_forward_of_the_whole_rendered_conversation(qwen_engine):
    image, options = noise_image(56, 56, 9), ["cat", "traffic light"]
    scores = qwen_engine.score_options([image], "Which label?", options).logprobs[0]
    prompt = qwen_engine.chat_prefix("Which label?")
    for option, score in zip(options, scores, strict=True):
        answer = qwen_engine.chat.answer(option)
        whole = qwen_engine.processor(images=[image], text=[prompt + answer.text], return_tensors="pt")
        with torch.no_grad():
            logits = qwen_engine.model(**whole).logits[0].float().log_softmax(-1)
        ids, n = whole["input_ids"][0], len(answer.ids)
        assert ids[-n:].tolist() == list(answer.ids)
        reference = sum(float(logits[len(ids) - n - 1 + i, t]) for i, t in enumerate(answer.ids))
        assert score == pytest.approx(reference, abs=1e-4)


def test_qwen_prefix_cache_equals_per_pair_with_images_of_different_sizes(qwen_engine):
    images = [noise_image(56, 56, 1), noise_image(90, 40, 2), noise_image(56, 56, 3), noise_image(30, 100, 4)]
    options = ["cat", "dog", "traffic light", "stop sign"]
    qwen_engine.prefix_cache = False
    per_pair = qwen_engine.score_options(images, "Which label?", options).logprobs
    qwen_engine.prefix_cache = True
    cached = qwen_engine.score_options(images, "Which label?", options).logprobs
    np.testing.assert_allclose(cached, per_pair, atol=1e-4)
    alone = np.concatenate([qwen_engine.score_options([image], "Which label?", options).logprobs for image in images])
    np.testing.assert_allclose(alone, per_pair, atol=1e-4)
    assert np.ptp(per_pair[:, 0]) > 1e-3, "scores depend on the image"


def test_qwen_keeps_no_image_prefixes_because_its_positions_depend_on_the_batch(qwen_engine):
    # Its multimodal rope stores per-batch position offsets on the model, so a stored prefix would misplace them.
    assert not qwen_engine.shares_images
    qwen_engine.score_options([noise_image(56, 56, 7)], "Which label?", ["cat", "dog"])
    assert len(qwen_engine.image_prefixes) == 0
