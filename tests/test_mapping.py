"""Out-of-set answers mapped with a real text encoder (all-MiniLM-L6-v2, shipped inside a PyPI package)."""

from __future__ import annotations

import numpy as np
import pytest

from backend.annotate.boxes import name_category, name_crops
from backend.annotate.mapping import LabelMapper
from backend.models.remote import OpenAIEngine
from backend.models.text_encoder import SentenceEncoder
from backend.prompts import PromptBook
from backend.settings import PACKAGE_PROMPTS
from tests.conftest import noise_image
from tests.loopback import LoopbackServer, Reply

LABELS = ["car", "cat", "laptop", "person", "traffic light", "dog"]


@pytest.fixture(scope="module")
def mapper() -> LabelMapper:
    return LabelMapper(SentenceEncoder(), min_similarity=0.45)


@pytest.mark.parametrize(
    "answer, label", [("automobile", "car"), ("kitty", "cat"), ("laptop computer", "laptop"), ("pedestrian", "person")]
)
def test_paraphrases_map_to_their_label(mapper, answer, label):
    mapping = mapper.map(answer, LABELS)
    assert mapping.label == label and mapping.mapped and not mapping.exact
    assert 0.45 <= mapping.similarity <= 1.0


def test_an_unrelated_answer_stays_unmapped_below_the_threshold(mapper):
    mapping = mapper.map("banana bread recipe", LABELS)
    assert mapping.label is None and not mapping.mapped
    assert mapping.similarity < 0.45


def test_exact_answers_need_no_encoder():
    class NoEncoder:
        def encode(self, texts):
            raise AssertionError("the encoder was not needed")

    mapping = LabelMapper(NoEncoder()).map("  Traffic-Light. ", LABELS)
    assert (mapping.label, mapping.exact, mapping.similarity) == ("traffic light", True, 1.0)


def test_similarities_are_cosines_of_unit_vectors(mapper):
    vectors = mapper.encoder.encode(["car", "automobile"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert mapper.map("automobile", ["car"]).similarity == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-5)


def test_agreement_fallback_maps_free_text_answers_onto_labels(mapper):
    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "an automobile"}}]}
    with LoopbackServer({"POST /v1/chat/completions": lambda _: Reply.json(reply)}) as server:
        engine = OpenAIEngine(f"{server.url}/v1", "m", samples=3, map_answer=mapper.index)
        probabilities = engine.score_options([noise_image(10, 10)], "Which?", LABELS).probabilities[0]
    assert engine.scoring_method == "agreement"
    expected = (3 + 0.5) / (3 + 0.5 * len(LABELS))
    assert probabilities[LABELS.index("car")] == pytest.approx(expected)


@pytest.mark.parametrize(
    "name, category", [("Dachshund (Dog)", "Dog"), ("Siamese kitten", "Siamese kitten"), ("Tabby (cat).", "cat")]
)
def test_a_fine_name_s_category_is_its_parenthesis(name, category):
    assert name_category(name) == category


def test_fine_names_from_the_model_carry_confidence_and_mapped_category(llava_engine, mapper):
    crops = [noise_image(8, 8, 1), noise_image(30, 20, 2), noise_image(12, 40, 3)]
    names = name_crops(llava_engine, PromptBook(PACKAGE_PROMPTS), crops, ["dog", "cat", "dog"], LABELS, mapper)
    assert len(names) == 3
    for name in names:
        assert isinstance(name.text, str)
        assert 0.0 < name.confidence <= 1.0  # geometric-mean token probability of the generated name
        if name.category is not None:
            assert name.category.label is None or name.category.label in LABELS


def test_a_fine_name_is_asked_without_the_label_unless_the_prompt_names_it(llava_engine, tmp_path):
    """The shipped prompt leaves the label out (one batch for every box); a prompt with {label} asks per label."""
    import shutil

    asked: list[tuple[str, int]] = []

    class Recording:
        name = llava_engine.name

        def generate(self, images, prompt, max_new_tokens=32):
            asked.append((prompt, len(images)))
            return llava_engine.generate(images, prompt, max_new_tokens)

    crops = [noise_image(20, 20, k) for k in range(3)]
    name_crops(Recording(), PromptBook(PACKAGE_PROMPTS), crops, ["dog", "car", "dog"], LABELS, None)
    assert len(asked) == 1 and asked[0][1] == 3 and " dog" not in asked[0][0] and " car" not in asked[0][0]
    shutil.copytree(PACKAGE_PROMPTS, tmp_path / "p")
    (tmp_path / "p" / "box_fine_label.txt").write_text("This image shows a {label}. Name it precisely.")
    asked.clear()
    name_crops(Recording(), PromptBook(tmp_path / "p"), crops, ["dog", "cat", "dog"], LABELS, None)
    assert sorted((prompt.split(".")[0], n) for prompt, n in asked) == [("This image shows a cat", 1),
                                                                       ("This image shows a dog", 2)]  # fmt: skip
