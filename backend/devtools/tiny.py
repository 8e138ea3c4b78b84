"""Tiny random-weight image-text-to-text checkpoints, built offline.

These exist for demos and tests on machines without a GPU or a model hub: the
checkpoint is written with ``save_pretrained`` and read back through exactly the
same ``AutoProcessor`` / ``AutoModelForImageTextToText`` path a real model takes
(``vit``: an image backbone for the downstream classifier, read through
``AutoModelForImageClassification``). Its weights are random, so its labels are random too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

Arch = Literal["llava", "idefics3", "vit"]
ARCHES: tuple[Arch, ...] = ("llava", "idefics3", "vit")

COCO_CLASSES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign parking meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard sports ball kite baseball bat baseball glove skateboard surfboard tennis racket bottle wine glass "
    "cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot dog pizza donut cake chair couch "
    "potted plant bed dining table toilet tv laptop mouse remote keyboard cell phone microwave oven toaster sink "
    "refrigerator book clock vase scissors teddy bear hair drier toothbrush"
)
# Real tokenizers spell common label names in 1-3 tokens; a corpus with them keeps the tiny one comparable.
_CORPUS = [
    "Which label best describes the object in the picture? Answer with one label.",
    "Cat Dog Bird Car Person Other Indoor Outdoor Blurry traffic light stop sign",
    COCO_CLASSES,
    COCO_CLASSES.title(),
    "Dachshund (Dog) Siamese (Cat) yes no correct wrong the a an of in on",
    "USER: ASSISTANT: User: Assistant: 0123456789 , . ? ! ( ) : ; - _ / é ü ñ 猫 犬",
]

LLAVA_TEMPLATE = (  # LLaVA-1.5's conversation format (also the shapes model's)
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_IDEFICS3_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _train_tokenizer(special_tokens: list[str], eos: str, pad: str) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=pad)


def _text_config(vocab_size: int, pad_id: int, eos_id: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
        tie_word_embeddings=False,
    )


_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
               patch_size=8)  # fmt: skip


def _save(model_class: type, config: object, processor: object, out: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = model_class(config)
    _sharpen_lm_head(model, seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _sharpen_lm_head(model: torch.nn.Module, seed: int) -> None:
    # With the default init every next-token log-prob is ~ -log V, so tests that compare
    # scores would assert almost nothing; a wider head makes label scores differ.
    generator = torch.Generator().manual_seed(seed)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.5)


def _build_llava(out: Path, seed: int) -> None:
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _train_tokenizer(["<pad>", "</s>", "<image>"], eos="</s>", pad="<pad>")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(**_VISION, projection_dim=32)
    text = LlamaConfig(**_text_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id))
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=32),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    _save(LlavaForConditionalGeneration, config, processor, out, seed)


def _build_idefics3(out: Path, seed: int) -> None:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    specials = ["<pad>", "<end_of_utterance>", "<image>", "<fake_token_around_image>", "<global-img>"]
    tokenizer = _train_tokenizer(specials, eos="<end_of_utterance>", pad="<pad>")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = Idefics3VisionConfig(**_VISION)
    text = LlamaConfig(**_text_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id))
    config = Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_id,
        scale_factor=2,
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 32},
        max_image_size={"longest_edge": 32},
        do_image_splitting=False,
    )
    # (32 / 8)^2 patches merged by scale_factor^2 = 4 image tokens per image.
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=4,
        chat_template=_IDEFICS3_TEMPLATE,
    )
    _save(Idefics3ForConditionalGeneration, config, processor, out, seed)


def _build_vit(out: Path, seed: int) -> None:
    """An image backbone (no head) for the downstream classifier: CLASSIFIER_BACKBONE=DIR."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    config = ViTConfig(**{k: v for k, v in _VISION.items()}, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    ViTModel(config, add_pooling_layer=False).save_pretrained(out)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(out)


def build_tiny_checkpoint(out_dir: str | Path, arch: Arch = "llava", seed: int = 0) -> Path:
    """Write a tiny random-weight checkpoint (model + processor) to ``out_dir``."""
    builders = {"llava": _build_llava, "idefics3": _build_idefics3, "vit": _build_vit}
    if arch not in builders:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builders[arch](out, seed)
    return out
