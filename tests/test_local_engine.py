"""The local transformers provider, on tiny checkpoints loaded through the real Auto classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.annotate.choice import choose_label
from backend.cli import main as cli
from backend.models.local import TransformersEngine
from backend.prompts import PromptBook
from backend.settings import PACKAGE_PROMPTS
from tests.conftest import noise_image

LABELS = ["Cat", "Dog", "Other, misc", "Dachshund (Dog)", "猫", "traffic light"]
PROMPT = "Which label?"


def images(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [noise_image(int(w), int(h), seed + i) for i, (w, h) in enumerate(rng.integers(8, 80, size=(count, 2)))]


def _reference_logprob(engine: TransformersEngine, image, prompt: str, option: str) -> float:
    """Independent check: the whole conversation in one plain forward, summing the answer's log-probs."""
    prefix = engine.chat_prefix(prompt)
    answer = list(engine._answer_ids(option))
    encoded = engine.processor(images=[image], text=[prefix], return_tensors="pt", **engine._tokenizing)
    ids = torch.cat([encoded["input_ids"], torch.tensor([answer])], dim=1)
    inputs = {k: v for k, v in encoded.items() if k not in {"input_ids", "attention_mask"}}
    with torch.no_grad():
        logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits[0]
    logprobs = logits.float().log_softmax(-1)
    start = encoded["input_ids"].shape[1]
    return float(sum(logprobs[start - 1 + i, token] for i, token in enumerate(answer)))


@pytest.fixture(scope="module", params=["llava", "idefics3"])
def summing_engine(request):
    checkpoint = request.getfixturevalue(f"tiny_{request.param}")
    return TransformersEngine.load(str(checkpoint), "cpu", batch_size=4, option_scoring="sum")


def test_cli_tiny_model_loads_through_the_auto_classes(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cli(["tiny-model", str(tmp_path / "m"), "--arch", "llava"])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    processor = AutoProcessor.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["prefix-kv", "per-pair"])
def test_scores_equal_an_independent_forward(summing_engine, prefix_cache):
    summing_engine.prefix_cache = prefix_cache
    batch = images(3)
    scores = summing_engine.score_options(batch, PROMPT, LABELS)
    assert scores.logprobs.shape == (3, len(LABELS))
    np.testing.assert_allclose(scores.probabilities.sum(axis=1), 1.0, atol=1e-9)
    for i, j in [(0, 0), (1, 2), (2, 3)]:
        assert scores.logprobs[i, j] == pytest.approx(
            _reference_logprob(summing_engine, batch[i], PROMPT, LABELS[j]), abs=1e-4
        )


def test_prefix_kv_equals_per_pair_at_every_batch_size(summing_engine):
    batch = images(7, seed=3)
    summing_engine.prefix_cache, summing_engine.batch_size = False, 64
    reference = summing_engine.score_options(batch, PROMPT, LABELS).logprobs
    summing_engine.prefix_cache = True
    for batch_size, option_batch in [(1, 1), (3, 5), (4, 256), (16, 7)]:
        summing_engine.batch_size, summing_engine.option_batch_size = batch_size, option_batch
        np.testing.assert_allclose(summing_engine.score_options(batch, PROMPT, LABELS).logprobs, reference, atol=1e-4)


def test_a_batch_of_crops_equals_each_crop_alone(summing_engine):
    batch = images(5, seed=9)
    together = summing_engine.score_options(batch, PROMPT, LABELS).logprobs
    alone = np.concatenate([summing_engine.score_options([crop], PROMPT, LABELS).logprobs for crop in batch])
    np.testing.assert_allclose(alone, together, atol=1e-4)


def test_prefix_kv_runs_the_prefix_once_per_image_chunk(llava_engine):
    llava_engine.prefix_cache, llava_engine.batch_size = True, 8
    llava_engine.shares_images = False
    llava_engine.forward_passes = 0
    llava_engine.score_options(images(8), PROMPT, LABELS)
    assert llava_engine.forward_passes == 2  # one prefix forward, one forward for every option row
    llava_engine.prefix_cache = False
    llava_engine.forward_passes = 0
    llava_engine.score_options(images(8), PROMPT, LABELS)
    assert llava_engine.forward_passes == 8 * len(LABELS) // 8
    llava_engine.prefix_cache, llava_engine.shares_images = True, True


@pytest.mark.parametrize("checkpoint", ["tiny_llava", "tiny_idefics3"])
def test_a_second_question_about_a_crop_reuses_its_vision_pass(checkpoint, request):
    engine = TransformersEngine.load(str(request.getfixturevalue(checkpoint)), "cpu", batch_size=8)
    unshared = TransformersEngine(engine.model, engine.processor, "unshared", batch_size=8, image_cache_mb=0)
    crops, critic = images(6, seed=21), "Is the label wrong? Answer yes or no."
    assert engine.shares_images and not unshared.shares_images
    first = engine.score_options(crops, PROMPT, LABELS)
    assert engine.vision_passes == 6 and len(engine.image_prefixes) == 6
    second = engine.score_options(crops[::-1], critic, ["yes", "no"])
    assert engine.vision_passes == 6  # the critic's question ran on the stored prefixes
    np.testing.assert_allclose(first.logprobs, unshared.score_options(crops, PROMPT, LABELS).logprobs, atol=1e-4)
    np.testing.assert_allclose(
        second.logprobs, unshared.score_options(crops[::-1], critic, ["yes", "no"]).logprobs, atol=1e-4
    )
    assert unshared.vision_passes == 12
    assert engine.prefill_tokens < unshared.prefill_tokens


def test_the_image_prefix_store_keeps_to_its_budget(tiny_llava):
    engine = TransformersEngine.load(str(tiny_llava), "cpu", batch_size=8)
    engine.score_options(images(2, seed=5), PROMPT, LABELS)
    row_bytes = engine.image_prefixes._bytes // 2
    engine.image_prefixes.clear()
    engine.image_prefixes.budget_bytes = 3 * row_bytes
    crops = images(5, seed=6)
    engine.score_options(crops, PROMPT, LABELS)  # all five scored, only the last three kept
    assert len(engine.image_prefixes) == 3
    engine.vision_passes = 0
    engine.score_options(crops[-3:], PROMPT, ["Cat"])
    assert engine.vision_passes == 0
    engine.score_options(crops[:1], PROMPT, ["Cat"])
    assert engine.vision_passes == 1


def test_answer_tokens_are_the_label_then_end_of_turn(llava_engine):
    tokenizer = llava_engine.tokenizer
    for label in LABELS:
        ids = list(llava_engine._answer_ids(label))
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[:-1]).strip() == label


def test_mean_scoring_gives_no_option_an_edge_for_its_length(tiny_llava):
    options = ["cat", "cat cat cat cat cat cat", "traffic light"]
    for method in ("mean", "sum"):
        engine = TransformersEngine.load(str(tiny_llava), "cpu", option_scoring=method)
        lengths = [len(engine._answer_ids(o)) for o in options]
        assert len(set(lengths)) == 3
        with torch.no_grad():  # a model with no preference: every token has probability 1 / vocabulary
            engine.model.get_output_embeddings().weight.zero_()
        probabilities = engine.score_options(images(2), PROMPT, options).probabilities
        if method == "mean":
            np.testing.assert_allclose(probabilities, 1 / 3, atol=1e-6)
        else:  # the bias "mean" removes: the shortest answer wins on length alone
            assert (probabilities.argmax(axis=1) == int(np.argmin(lengths))).all()


def test_crops_get_a_distribution_over_the_label_set(llava_engine):
    crops = [noise_image(10, 12, 5), noise_image(30, 8, 6), noise_image(3, 3, 7)]
    choices = choose_label(llava_engine, PromptBook(PACKAGE_PROMPTS), "box_label", crops, LABELS)
    assert len(choices) == 3
    for choice in choices:
        assert choice.labels == tuple(LABELS)
        assert sum(choice.probabilities) == pytest.approx(1.0)
        assert choice.label == LABELS[int(np.argmax(choice.probabilities))]
    logprobs = llava_engine.score_options(crops, PROMPT, LABELS).logprobs
    assert np.ptp(logprobs[:, 0]) > 1e-3, "scores depend on the image"


def test_generation_returns_text_with_per_token_logprobs(llava_engine):
    generations = llava_engine.generate(images(2), "Describe the object.", max_new_tokens=5)
    assert len(generations) == 2
    for generation in generations:
        assert isinstance(generation.text, str)
        assert 1 <= len(generation.token_logprobs) <= 5
        assert all(lp <= 0 for lp in generation.token_logprobs)
        assert generation.logprob == pytest.approx(sum(generation.token_logprobs))


@pytest.mark.parametrize("quantization, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_loading_swaps_in_bitsandbytes_layers_and_still_labels(tiny_llava, llava_engine, quantization, layer):
    engine = TransformersEngine.load(str(tiny_llava), "cpu", quantization=quantization)
    layers = {type(m).__name__ for name, m in engine.model.named_modules() if ".language_model." in f".{name}."}
    assert layer in layers and "Linear" not in layers - {layer}
    assert engine.model.get_memory_footprint() < llava_engine.model.get_memory_footprint()
    choices = choose_label(engine, PromptBook(PACKAGE_PROMPTS), "box_label", images(2), LABELS)
    assert all(sum(c.probabilities) == pytest.approx(1.0) for c in choices)


@pytest.mark.parametrize("checkpoint", ["tiny_llava", "tiny_idefics3"])
def test_answer_tokens_do_not_depend_on_the_prompt_so_they_are_worked_out_once(checkpoint, request):
    engine = TransformersEngine.load(str(request.getfixturevalue(checkpoint)), "cpu")
    prompts = [PROMPT, "Which label? " + ", ".join(f"label {i}" for i in range(300)) + "\nAnswer:", "x"]
    for option in ["cat", "Chat, domestique", "猫", " leading space", "a\nb", "label 12"]:
        rendered = {engine.chat.answer(option, question=prompt).ids for prompt in prompts}
        assert rendered == {engine._answer_ids(option)}, option


def test_a_question_too_long_to_continue_a_stored_prefix_prefills_its_image_again(tiny_llava, monkeypatch):
    from backend.models import local

    engine = TransformersEngine.load(str(tiny_llava), "cpu")
    monkeypatch.setattr(local, "SHARED_QUESTION_MAX_TOKENS", len(engine._split_after_image(PROMPT)[1]))
    crops = images(2, seed=31)
    engine.score_options(crops, PROMPT, LABELS)  # a short question: the prefixes are stored
    assert len(engine.image_prefixes) == 2 and engine.vision_passes == 2
    long_prompt = "Which label? " + " ".join(LABELS * 3)
    engine.score_options(crops, long_prompt, LABELS)
    assert engine.vision_passes == 4


@pytest.mark.parametrize("checkpoint", ["tiny_llava", "tiny_idefics3"])
def test_a_fine_name_generated_after_the_label_reuses_the_crops_vision_pass(checkpoint, request):
    engine = TransformersEngine.load(str(request.getfixturevalue(checkpoint)), "cpu", batch_size=4)
    unshared = TransformersEngine(engine.model, engine.processor, "unshared", batch_size=4, image_cache_mb=0)
    crops, question = images(5, seed=41), "Name the object precisely."
    engine.score_options(crops, PROMPT, LABELS)
    assert engine.vision_passes == 5
    shared = engine.generate(crops, question, max_new_tokens=6)
    assert engine.vision_passes == 5  # generation continued the stored prefixes
    alone = unshared.generate(crops, question, max_new_tokens=6)
    assert [g.text for g in shared] == [g.text for g in alone] and any(g.text for g in shared)
    for ours, theirs in zip(shared, alone, strict=True):
        np.testing.assert_allclose(ours.token_logprobs, theirs.token_logprobs, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_answer_token_logprobs_are_picked_slice_by_slice_without_a_full_vocabulary_copy(dtype, monkeypatch):
    from backend.models import local

    monkeypatch.setattr(local, "_POSITIONS_PER_SLICE", 3)  # 10 positions: slices of 3, 3, 3, 1
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn((2, 10, 50), generator=generator) * 4).to(dtype)
    targets = torch.randint(0, 50, (2, 10), generator=generator)
    expected = logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(local._target_logprobs(logits, targets), expected, rtol=0, atol=1e-5)
