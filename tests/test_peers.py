"""The peers `mllm-backend bench` compares against, and the comparison itself, on the shapes model."""

from __future__ import annotations

import pytest

from backend.evaluation.peers import parse_label, run_peers
from backend.shapes.training import SHIPPED

LABELS = ["circle", "square", "red circle", "triangle"]


@pytest.mark.parametrize(
    ("text", "label"),
    [("circle", "circle"), (" Square.", "square"), ("It is a red circle, I think", "red circle"),
     ("a triangle or a square", "triangle"), ("squares", None), ("no idea", None), ("", None)],
)  # fmt: skip
def test_free_text_is_parsed_into_the_label_it_names_first(text, label):
    assert parse_label(text, LABELS) == label


def test_the_comparison_counts_model_passes_alike_and_shares_one_vision_pass_per_crop(tmp_path):
    report = run_peers(str(SHIPPED), tasks=4, seed=2601, work=tmp_path)
    boxes = report["boxes"]
    assert boxes >= 8
    peers = report["peers"]
    for name in ("generate_and_parse", "pipeline_per_crop"):
        # a generation is one prefill, then one forward per new token: at least the label and end-of-turn
        assert peers[name]["model_passes_per_box"] >= 2.0
        assert 0.5 <= peers[name]["accuracy"] <= 1.0  # the shapes model answers in its labels' words
    assert report["this_backend"]["model_passes"] < peers["generate_and_parse"]["model_passes"] / 4
    assert peers["yes_no_per_label"]["model_passes_per_image"] >= 2 * 8  # a yes/no generation per label
    assert report["this_backend_tags"]["model_passes"] < peers["yes_no_per_label"]["model_passes"]
    # label and critic share one vision pass per crop; recomputed, each question pays its own
    assert report["vision_passes_per_crop"] == 1.0
    assert report["image_prefix_recomputed"]["vision_passes_per_crop"] == 2.0
    assert report["prefill_tokens_per_box"] == report["prefill_tokens_per_box_lower_bound"]
    assert report["prefill_tokens_per_box"] < report["image_prefix_recomputed"]["prefill_tokens_per_box"]
    assert report["this_backend"]["accuracy"] >= peers["generate_and_parse"]["accuracy"] - 0.15


def test_the_direct_client_replays_every_request_the_backend_sent_through_transformers_serve(tmp_path):
    from backend.evaluation.through_server import openai_vs_direct
    from backend.shapes.world import generate_world

    report = openai_vs_direct(str(SHIPPED), tasks=2, seed=2602, work=tmp_path, concurrency=4)
    boxes = sum(len(scene.shapes) for scene, _ in generate_world(tasks=2, seed=2602))
    # no log-probabilities from this server: every box is asked OPENAI_SAMPLES (5) times, and all were replayed
    assert report["requests"] == 5 * boxes
    assert report["backend_requests_per_s"] > 0 and report["ratio"] > 0
