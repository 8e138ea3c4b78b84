"""The review store behaves the same on SQLite (the default) and on PostgreSQL (DATABASE_URL)."""

from __future__ import annotations

import pytest

from backend.labelstudio.outcomes import PredictedLabel
from backend.reviews import ReviewStore
from backend.settings import Settings, SettingsError


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> ReviewStore:
    location = request.getfixturevalue("postgres_url") if request.param == "postgresql" else tmp_path / "r.sqlite3"
    return ReviewStore(location, min_reviews=4)


def _boxes(labels: dict[str, str]) -> list[dict]:
    return [{"id": region, "from_name": "label", "type": "rectanglelabels",
             "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": [label]}}
            for region, label in labels.items()]  # fmt: skip


def test_predictions_reviews_and_the_calibrator_round_trip(store):
    first = [PredictedLabel(task, "a", "label", "cat", 0.1 * task) for task in range(1, 9)]
    store.record_predictions(3, "v1", first, annotator=[0.9] * 8, out_of_set=["Kitten"] + [None] * 7)
    assert store.suggestions(3) == [{"text": "Kitten", "count": 1, "labelled_as": {"cat": 1}, "controls": ["label"],
                                     "tasks": [1]}]  # fmt: skip
    store.record_predictions(3, "v2", [PredictedLabel(1, "a", "label", "cat", 0.95)])  # a re-prediction replaces
    assert store.suggestions(3) == []
    for task in range(1, 9):
        assert store.record_annotation(3, task, _boxes({"a": "cat" if task % 2 else "dog"}), annotation=task) == 1
    raw, kept = store.outcomes(3)
    assert sorted(zip(raw, kept, strict=True))[-1] == (pytest.approx(0.95), True)
    assert sum(kept) == 4 and len(raw) == 8
    assert store.calibrator(3) is not None and store.status()["3"]["reviewed_labels"] == 8
    store.forget(3, annotation=2)
    store.forget(3, task=3)
    assert len(store.outcomes(3)[0]) == 6
    store.record_predictions(3, "v1", [], usage=[(1, 0.5, 1, 2, 30), (2, 0.25, 1, 1, 20)])
    store.record_predictions(3, "v1", [], usage=[(1, 0.75, 1, 2, 30)])  # the same task again replaces its row
    assert sorted(u["seconds"] for u in store.usage(3, "v1")) == [0.25, 0.75]
    assert store.annotator_task_scores(3, "v1") == {task: pytest.approx(0.9) for task in range(2, 9)}


def test_the_store_opened_again_keeps_everything(store):
    store.record_predictions(4, "v1", [PredictedLabel(1, "a", "label", "cat", 0.25)])
    again = ReviewStore(store.location, min_reviews=4)
    again.record_annotation(4, 1, _boxes({"a": "cat"}))
    assert store.outcomes(4) == ([0.25], [True])


def test_database_url_selects_postgresql_and_a_wrong_one_is_refused_without_echoing_it(tmp_path, postgres_url):
    settings = Settings.from_env({"MLLM_MODEL": "m", "MODEL_DIR": str(tmp_path), "DATABASE_URL": postgres_url})
    assert ReviewStore.for_settings(settings).postgres
    assert not ReviewStore.for_settings(Settings.from_env({"MLLM_MODEL": "m", "MODEL_DIR": str(tmp_path)})).postgres
    assert "DATABASE_URL" not in repr(settings) and postgres_url not in repr(settings)
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"MLLM_MODEL": "m", "DATABASE_URL": "mysql://root:hunter2@db/x"})
    assert "hunter2" not in str(refused.value) and "postgresql://" in str(refused.value)


def test_a_requests_labels_and_usage_are_written_together(store):
    store.record_predictions(6, "v1", [PredictedLabel(1, "a", "label", "cat", 0.5)], usage=[(1, 0.5, 1, 1, 10)])
    assert store.usage(6, "v1") == [{"task": 1, "seconds": 0.5, "images": 1, "boxes": 1, "tokens": 10}]
    assert store.outcomes(6) == ([], [])  # predicted, not reviewed yet
