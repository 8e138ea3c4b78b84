"""The local transformers provider, on tiny checkpoints loaded through the real Auto classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.annotate.boxes import label_crops
from backend.cli import main as cli
from backend.models.local import TransformersEngine
from backend.prompts import PromptBook
from backend.settings import PACKAGE_PROMPTS
from tests.conftest import noise_image

LABELS = ["Cat", "Dog", "Other, misc", "Dachshund (Dog)", "猫"]


def _reference_logprob(engine: TransformersEngine, image, prompt: str, option: str) -> float:
    """Independent check: render the whole conversation, one plain forward, sum the answer's log-probs."""
    prefix = engine.chat_prefix(prompt)
    answer = list(engine._answer_ids(prompt, option))
    encoded = engine.processor(images=[image], text=[prefix], return_tensors="pt")
    ids = torch.cat([encoded["input_ids"], torch.tensor([answer])], dim=1)
    inputs = {k: v for k, v in encoded.items() if k not in {"input_ids", "attention_mask"}}
    with torch.no_grad():
        logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits[0]
    logprobs = logits.float().log_softmax(-1)
    start = encoded["input_ids"].shape[1]
    return float(sum(logprobs[start - 1 + i, token] for i, token in enumerate(answer)))


def test_cli_tiny_model_loads_through_the_auto_classes(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cli(["tiny-model", str(tmp_path / "m"), "--arch", "llava"])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    processor = AutoProcessor.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


@pytest.mark.parametrize("arch", ["llava", "idefics3"])
def test_scores_match_an_independent_forward_and_batching_changes_nothing(arch, request):
    checkpoint = request.getfixturevalue(f"tiny_{arch}")
    engine = TransformersEngine(str(checkpoint), "cpu", batch_size=4)
    images = [noise_image(40, 30, 1), noise_image(17, 61, 2), noise_image(64, 64, 3)]
    prompt = "Which label?"
    batched = engine.score_options(images, prompt, LABELS)
    assert batched.logprobs.shape == (3, len(LABELS))
    np.testing.assert_allclose(batched.probabilities.sum(axis=1), 1.0, atol=1e-9)
    for i, image in enumerate(images):
        alone = engine.score_options([image], prompt, LABELS)
        np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[i], atol=1e-4)
    reference = _reference_logprob(engine, images[1], prompt, LABELS[2])
    assert batched.logprobs[1, 2] == pytest.approx(reference, abs=1e-4)
    engine.batch_size = 1
    np.testing.assert_allclose(engine.score_options(images, prompt, LABELS).logprobs, batched.logprobs, atol=1e-4)


def test_answer_tokens_are_the_label_then_end_of_turn(llava_engine):
    tokenizer = llava_engine.tokenizer
    for label in LABELS:
        ids = list(llava_engine._answer_ids("Which label?", label))
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[:-1]).strip() == label


def test_three_crops_get_a_distribution_over_the_label_set(llava_engine):
    prompts = PromptBook(PACKAGE_PROMPTS)
    crops = [noise_image(10, 12, 5), noise_image(30, 8, 6), noise_image(3, 3, 7)]
    choices = label_crops(llava_engine, prompts, crops, LABELS)
    assert len(choices) == 3
    for choice in choices:
        assert choice.labels == tuple(LABELS)
        assert sum(choice.probabilities) == pytest.approx(1.0)
        assert choice.label == LABELS[int(np.argmax(choice.probabilities))]
        assert choice.probability == max(choice.probabilities)
    # random weights still give image-dependent scores, not a constant
    logprobs = llava_engine.score_options(crops, "Which label?", LABELS).logprobs
    assert np.ptp(logprobs[:, 0]) > 1e-3
