"""Qwen2.5-VL (3-D rotary positions) through the local engine's prefix cache.

The model is a tiny random Qwen2.5-VL round-tripped through save_pretrained/from_pretrained.
Its processor cannot be built on this machine: transformers' Qwen processors need
torchvision, which does not run beside torch 2.13 (CPU). `QwenProcessorStandIn` stands in
for it, built from the real `Qwen2VLImageProcessorPil` and a tokenizer: it expands each
<|image_pad|> to the image's merged patch count and adds `mm_token_type_ids`, as the real one does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from backend.devtools.tiny import _sharpen_lm_head, _text_config, _train_tokenizer
from backend.models.local import TransformersEngine
from tests.conftest import noise_image

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MERGE = 2


class QwenProcessorStandIn:
    def __init__(self) -> None:
        from transformers import Qwen2VLImageProcessorPil

        specials = [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
        ]
        self.tokenizer = _train_tokenizer(specials, eos="<|im_end|>", pad="<|endoftext|>")
        self.tokenizer.chat_template = TEMPLATE
        self.image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
        self.image_pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def apply_chat_template(self, messages, **options):
        return self.tokenizer.apply_chat_template(messages, **options)

    def __call__(self, images, text, return_tensors="pt", padding=False):
        vision = self.image_processor(images=images, return_tensors=return_tensors)
        counts = iter((vision["image_grid_thw"].prod(-1) // MERGE**2).tolist())
        expanded = []
        for line in text:
            parts = line.split("<|image_pad|>")
            expanded.append(parts[0] + "".join("<|image_pad|>" * next(counts) + part for part in parts[1:]))
        encoded = self.tokenizer(expanded, return_tensors=return_tensors, padding=True)
        encoded["mm_token_type_ids"] = (encoded["input_ids"] == self.image_pad).long()
        return {**encoded, **vision}


@pytest.fixture(scope="module")
def qwen_engine(tmp_path_factory) -> TransformersEngine:
    processor = QwenProcessorStandIn()
    tokenizer = processor.tokenizer
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
        image_token_id=processor.image_pad,
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _sharpen_lm_head(model, 0)
    path = tmp_path_factory.mktemp("qwen")
    model.save_pretrained(path)
    loaded = AutoModelForImageTextToText.from_pretrained(path)
    assert type(loaded).__name__ == "Qwen2_5_VLForConditionalGeneration"
    return TransformersEngine(loaded, processor, "tiny-qwen2.5-vl", batch_size=4, option_scoring="sum")


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
