"""The OpenAI-compatible provider against a real server (`transformers serve` on a tiny checkpoint).

`transformers serve` returns no log-probabilities, so it exercises the documented fallback. Faults
and the letters strategy of servers with ``top_logprobs`` only (hosted APIs) are exercised against
loopback stand-ins; the full-label strategy against the real vLLM in ``test_vllm.py``.
"""

from __future__ import annotations

import base64
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from backend.devtools.devstack import free_port
from backend.devtools.serve import transformers_serve
from backend.devtools.tiny import build_tiny_checkpoint
from backend.models.engine import EngineError, EngineUnavailable
from backend.models.remote import OpenAIEngine
from backend.models.strategies import SMOOTHING, answer_tokens, match_answer
from backend.models.wire import Token
from backend.prompts import LETTERS, TEMPLATES, lettered_question
from tests.conftest import noise_image, png_bytes
from tests.loopback import LoopbackServer, Reply, Seen

LABELS = ["Cat", "Dog", "Other"]


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> tuple[str, str]:
    """`transformers serve` on loopback with a tiny checkpoint: (base URL, model name)."""
    checkpoint = build_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", "llava")
    with transformers_serve(checkpoint) as base_url:
        yield base_url, str(checkpoint)


def test_agreement_fallback_against_a_server_without_logprobs(served_model):
    base_url, model = served_model
    engine = OpenAIEngine(base_url, model, samples=3, timeout=60)
    scores = engine.score_options([noise_image(40, 30, 1), noise_image(20, 50, 2)], "Which label?", LABELS)
    assert engine.scoring_method == "agreement"
    probabilities = scores.probabilities
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    # every probability is (count + 0.5) / (3 + 0.5 * 3) for a whole count of the 3 samples
    counts = probabilities * (3 + SMOOTHING * len(LABELS)) - SMOOTHING
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
    assert ((counts > -1e-9) & (counts.sum(axis=1, keepdims=True) <= 3 + 1e-9)).all()


def test_generation_through_the_server_has_text_and_no_logprobs(served_model):
    base_url, model = served_model
    [generation] = OpenAIEngine(base_url, model).generate([noise_image(30, 30)], "Describe it.", max_new_tokens=4)
    assert isinstance(generation.text, str) and generation.token_logprobs is None


def test_box_labelling_request_succeeds_through_the_server(served_model, tmp_path):
    from backend.server import create_app
    from backend.service import build_service
    from backend.settings import Settings

    base_url, model = served_model
    settings = Settings.from_env(
        {
            "MLLM_PROVIDER": "openai",
            "OPENAI_BASE_URL": base_url,
            "MLLM_MODEL": model,
            "OPENAI_SAMPLES": "2",
            "MODEL_DIR": str(tmp_path),
        }
    )
    client = create_app(build_service(settings)).test_client()
    config = (Path(__file__).resolve().parents[1] / "label_config" / "boxes.xml").read_text()
    image = "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(64, 48))).decode()
    boxes = [
        {
            "id": f"b{i}",
            "from_name": "label",
            "to_name": "image",
            "type": "rectanglelabels",
            "value": {"x": 10 * i, "y": 10, "width": 20, "height": 30, "rotation": 0, "rectanglelabels": ["Cat"]},
        }
        for i in range(3)
    ]
    task = {"id": 1, "data": {"image": image}, "annotations": [{"result": boxes}]}
    body = client.post("/predict", json={"tasks": [task], "label_config": config, "project": "1.1"}).get_json()
    [prediction] = body["results"]
    assert [r["id"] for r in prediction["result"]] == ["b0", "b1", "b2"]
    assert all(0 < r["score"] <= 1 for r in prediction["result"])
    scoring = client.get("/versions").get_json()["scoring"]["annotator"]
    assert scoring["method"] == "agreement" and "no prompt log-probabilities" in scoring["why"]
    assert any("scores by sampling agreement" in w for w in client.get("/health").get_json()["warnings"])


def logprob_reply(top: dict[str, float], content: str = "A") -> dict:
    entries = [{"token": token, "logprob": logprob} for token, logprob in top.items()]
    return {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": {
                    "content": [{"token": content, "logprob": entries[0]["logprob"], "top_logprobs": entries}]
                },
            }
        ]
    }


def test_a_lettered_question_is_scored_by_each_letter_at_the_first_answer_token():
    """A server with top_logprobs but no prompt log-probabilities (a hosted API): multiple-choice questions are
    scored by their letters; the probe for prompt log-probabilities is sent once, not per question."""
    top = {"B": math.log(0.6), " A": math.log(0.25), "b": math.log(0.05), "The": math.log(0.05)}
    with LoopbackServer({"POST /v1/chat/completions": lambda _: Reply.json(logprob_reply(top, "B"))}) as server:
        engine = OpenAIEngine(f"{server.url}/v1", "m")
        question = lettered_question("Which label?\n- Cat\n- Dog\n- Other", LABELS)
        scores = engine.score_options([noise_image(10, 10)], question, LETTERS[:3])
        probe, sent = (json.loads(seen.body) for seen in server.seen)
        engine.score_options([noise_image(10, 10)], question, LETTERS[:3])
        assert len(server.seen) == 3
    assert probe["prompt_logprobs"] == 0 and probe["add_generation_prompt"] is True
    assert engine.scoring_method == "letters" and "no prompt log-probabilities" in engine.scoring_reason
    assert sent["logprobs"] is True and sent["top_logprobs"] == 20
    assert "A. Cat" in sent["messages"][0]["content"][1]["text"]
    assert sent["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    # A: 0.25; B: 0.6 + 0.05 ("b"); C unlisted: the 0.05 the list leaves over
    np.testing.assert_allclose(np.exp(scores.logprobs[0]), [0.25, 0.65, 0.05], atol=1e-9)


def test_retries_with_backoff_on_429_and_5xx_then_succeeds():
    replies = iter([Reply(503), Reply(429, headers={"Retry-After": "0"})])
    answer = Reply.json(logprob_reply({"A": -0.1}))
    with LoopbackServer({"POST /v1/chat/completions": lambda _: next(replies, answer)}) as server:
        engine = OpenAIEngine(f"{server.url}/v1", "m", max_retries=3)
        engine.score_options([noise_image(10, 10)], "Which label?", LETTERS[:3])
        assert len(server.seen) == 4  # the probe after two retries, then the question


def test_a_down_server_fails_fast_with_a_clear_error():
    engine = OpenAIEngine(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=1)
    with pytest.raises(EngineUnavailable, match="cannot connect.*OPENAI_BASE_URL"):
        engine.score_options([noise_image(10, 10)], "Which label?", LABELS)
    sent = engine.requests_sent
    with pytest.raises(EngineUnavailable, match="pause"):  # cooling down: no new connection attempts
        engine.score_options([noise_image(10, 10)], "Which label?", LABELS)
    assert engine.requests_sent == sent


def test_a_slow_server_times_out_for_those_tasks_and_the_key_stays_secret(tmp_path):
    from backend.server import create_app
    from backend.service import build_service
    from backend.settings import Settings

    def slow(_: Seen) -> Reply:
        time.sleep(3)
        return Reply.json(logprob_reply({"A": -0.1}))

    with LoopbackServer({"POST /v1/chat/completions": slow}) as server:
        settings = Settings.from_env(
            {
                "MLLM_PROVIDER": "openai",
                "OPENAI_BASE_URL": f"{server.url}/v1",
                "MLLM_MODEL": "m",
                "OPENAI_TIMEOUT": "0.5",
                "OPENAI_API_KEY": "sk-secret-42",
                "MODEL_DIR": str(tmp_path),
            }
        )
        client = create_app(build_service(settings)).test_client()
        config = (
            '<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="a"/>'
            '<Choice value="b"/></Choices></View>'
        )
        image = "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(8, 8))).decode()
        tasks = [{"id": n, "data": {"i": image}} for n in range(4)]
        body = client.post("/predict", json={"tasks": tasks, "label_config": config}).get_data(as_text=True)
        assert server.seen[0].headers["Authorization"] == "Bearer sk-secret-42"
    results = json.loads(body)["results"]
    assert len(results) == 4
    assert all("did not answer within 0.5 s" in r["error"] for r in results)
    assert "sk-secret-42" not in body


def test_a_bad_request_for_one_image_is_that_images_error():
    def picky(request: Seen) -> Reply:
        url = json.loads(request.body)["messages"][0]["content"][0]["image_url"]["url"]
        return Reply(400, b'{"error": "image too small"}') if len(url) < 200 else Reply.json(logprob_reply({"A": -0.1}))

    with LoopbackServer({"POST /v1/chat/completions": picky}) as server:
        engine = OpenAIEngine(f"{server.url}/v1", "m")
        with pytest.raises(EngineError, match="HTTP 400: .*image too small") as error:
            engine.score_options([noise_image(1, 1)], "?", LABELS)
        assert not isinstance(error.value, EngineUnavailable)
        assert engine.score_options([noise_image(40, 40)], "?", LABELS).logprobs.shape == (1, 3)


@pytest.mark.parametrize(
    "answer, expected",
    [("B", 1), ("b.", 1), ("(C) other", 2), ("Dog", 1), (" dog. ", 1), ("D", None), ("a cat", None), ("", None)],
)
def test_answers_are_matched_by_letter_or_exact_label(answer, expected):
    assert match_answer(answer, LABELS, lettered=True) == expected


@pytest.mark.parametrize(
    "template", ["box_label", "box_context_label", "image_choice", "tag_confirm", "critic", "tag_candidates"]
)
def test_a_lettered_question_gives_one_answer_instruction(template):
    from backend.prompts import PromptBook, format_labels
    from backend.settings import PACKAGE_PROMPTS

    book = PromptBook(PACKAGE_PROMPTS)
    labels = ["cat", "dog"]
    prompt = book.render(template, **{name: (format_labels(labels) if name == "labels" else "cat")
                                      for name in TEMPLATES[template]})  # fmt: skip
    options = ["yes", "no"] if "labels" not in TEMPLATES[template] else labels
    asked = lettered_question(prompt, options)
    assert asked.count("Answer") == 1 and asked.endswith("Answer with the letter of one option only.")
    assert "A. " + options[0] in asked.splitlines() and "B. " + options[1] in asked.splitlines()
    if template in {"box_label", "box_context_label", "image_choice"}:  # the labels get their letters in place
        assert "- cat" not in asked and asked.count("cat") == 1


def _tokens(*texts: str) -> list[Token]:
    return [(hash(text) % 10_000, -0.5, text) for text in texts]


def test_an_answer_is_its_tokens_after_the_generation_prompt_through_the_end_of_turn():
    head = _tokens("<s>", "USER", ":", "ASSISTANT", ":")
    turn = _tokens("<s>", "USER", ":", "ASSISTANT", ":", " red", " square", "</s>", "\n")
    assert [text for _, _, text in answer_tokens(head, turn)] == [" red", " square", "</s>"]
    merged = _tokens("<s>", "USER", ":", "ASSISTANT", ": red", " square", "</s>")  # the tokenizer joined ":" and " red"
    assert [text for _, _, text in answer_tokens(head, merged)] == [": red", " square", "</s>"]


def test_a_server_that_refuses_prompt_logprobs_by_name_falls_back_once_and_says_why():
    def hosted(request: Seen) -> Reply:
        if "prompt_logprobs" in json.loads(request.body):
            return Reply(400, b'{"error": {"message": "Unrecognized request argument supplied: prompt_logprobs"}}')
        return Reply.json(logprob_reply({"Dog": -0.2}, "Dog"))

    with LoopbackServer({"POST /v1/chat/completions": hosted}) as server:
        engine = OpenAIEngine(f"{server.url}/v1", "m", samples=2)
        scores = engine.score_options([noise_image(10, 10)], "Which label?\n- Cat\n- Dog\n- Other", LABELS)
        engine.score_options([noise_image(10, 10)], "Which label?", LABELS)
        bodies = [json.loads(seen.body) for seen in server.seen]
    assert sum("prompt_logprobs" in body for body in bodies) == 1
    assert engine.scoring_method == "agreement" and "no prompt log-probabilities" in engine.scoring_reason
    assert not any("A. Cat" in json.dumps(body) for body in bodies), "a closed question is never lettered"
    assert scores.probabilities[0].argmax() == 1


def test_each_provider_name_builds_its_own_engine_from_one_registry(tiny_llava):
    from backend.models.local import TransformersEngine
    from backend.models.providers import PROVIDERS
    from backend.service import engine_factory
    from backend.settings import PROVIDERS as NAMES
    from backend.settings import Settings, SettingsError

    assert tuple(PROVIDERS) == NAMES
    settings = Settings.from_env({"MLLM_MODEL": str(tiny_llava), "MLLM_PROVIDER": "openai",
                                  "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})  # fmt: skip
    assert isinstance(engine_factory(settings)(), OpenAIEngine)
    assert isinstance(engine_factory(settings, provider="transformers")(), TransformersEngine)
    with pytest.raises(SettingsError, match="MLLM_PROVIDER='vllm' is not supported; set it to one of transformers"):
        Settings.from_env({"MLLM_MODEL": "m", "MLLM_PROVIDER": "vllm"})
