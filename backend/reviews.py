"""What happened to our labels in review, per project, and the calibrators fitted from it.

Predicted labels (with their raw suspicion scores) are recorded when the backend predicts;
Label Studio's annotation webhooks then say which of them a human kept. Stored in SQLite
under ``MODEL_DIR`` so it survives restarts, or in PostgreSQL when ``DATABASE_URL`` is set,
so servers and workers on several hosts share one store.

Several processes share it (the server and its workers, as docker-compose runs them): every
write is one transaction that first takes the store's write lock (SQLite: ``BEGIN IMMEDIATE``
in WAL mode; PostgreSQL: a transaction-scoped advisory lock), so a read-then-write is atomic
across processes. A write that cannot get the lock within ``BUSY_TIMEOUT_SECONDS`` raises
:class:`StoreBusy`, which the server answers 503 so Label Studio's event is not acknowledged
and lost.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.annotate.suspicion import Calibrator
from backend.evaluation.metrics import cross_fitted_ece, expected_calibration_error
from backend.labelstudio.outcomes import PredictedLabel, review_outcomes

if TYPE_CHECKING:
    from backend.review_plan import ReviewPlan
    from backend.settings import Settings

# One schema for both databases: SQLite reads DOUBLE PRECISION as REAL; PostgreSQL's REAL would be 4 bytes.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS predicted (
    project INTEGER, task INTEGER, region TEXT, control TEXT, label TEXT, raw DOUBLE PRECISION, model_version TEXT,
    at DOUBLE PRECISION, annotator DOUBLE PRECISION, PRIMARY KEY (project, task, region, control, label));
CREATE TABLE IF NOT EXISTS usage (
    project INTEGER, task INTEGER, model_version TEXT, seconds DOUBLE PRECISION, images INTEGER, boxes INTEGER,
    tokens INTEGER, at DOUBLE PRECISION, PRIMARY KEY (project, task, model_version));
CREATE TABLE IF NOT EXISTS reviewed (
    project INTEGER, task INTEGER, region TEXT, control TEXT, label TEXT, raw DOUBLE PRECISION, survived INTEGER,
    at DOUBLE PRECISION, annotation INTEGER, PRIMARY KEY (project, task, region, control, label));
CREATE TABLE IF NOT EXISTS plans (
    project INTEGER, plan INTEGER, rule TEXT, floor DOUBLE PRECISION, seed INTEGER, at DOUBLE PRECISION,
    PRIMARY KEY (project, plan));
CREATE TABLE IF NOT EXISTS inclusion (
    project INTEGER, plan INTEGER, task INTEGER, score DOUBLE PRECISION, probability DOUBLE PRECISION,
    selected INTEGER, PRIMARY KEY (project, plan, task));
"""
# Stores made before a column existed get it added (name, declaration).
_ADDED_COLUMNS = {"reviewed": (("annotation", "INTEGER"),), "predicted": (("out_of_set", "TEXT"),)}
SUGGESTION_TASKS = 20  # task ids listed per out-of-set suggestion


BUSY_TIMEOUT_SECONDS = 20.0  # how long a write waits for another process's transaction
_WRITE_LOCK = 0x4D4C4C4D  # PostgreSQL advisory lock key of the store's writes ("MLLM")


class StoreBusy(RuntimeError):
    """The review store stayed locked by another process; nothing was written, retry the event."""


class _Postgres:
    """A psycopg connection answering sqlite3's calls (``?`` placeholders, ``execute`` and ``executemany``)."""

    def __init__(self, url: str) -> None:
        import psycopg

        self._connection = psycopg.connect(url, autocommit=True, connect_timeout=10)  # transactions are explicit

    def execute(self, query: str, params: Sequence = ()):  # noqa: ANN201 -- a psycopg cursor
        return self._connection.execute(query.replace("?", "%s"), params)

    def executemany(self, query: str, rows: Sequence[Sequence]) -> None:
        with self._connection.cursor() as cursor:
            cursor.executemany(query.replace("?", "%s"), rows)


class ReviewStore:
    """The review store at ``location``: a SQLite file path, or a ``postgresql://`` URL."""

    def __init__(self, location: Path | str, min_reviews: int = 30) -> None:
        self.min_reviews = min_reviews
        self.location = str(location)  # for other processes to open the same store; may hold a password
        self._lock = threading.Lock()
        self.postgres = self.location.startswith(("postgresql://", "postgres://"))
        if self.postgres:
            self.name = "PostgreSQL review store"  # never the URL: it may carry a password
            self._db = _Postgres(self.location)
        else:
            path = Path(location)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.name = f"review store {path.name}"
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                       timeout=BUSY_TIMEOUT_SECONDS)  # fmt: skip
            self._db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer; outside any transaction
        with self._writing() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            self._add_columns(db)
        self._calibrators: dict[int, tuple[tuple[int, int], Calibrator]] = {}

    @classmethod
    def for_settings(cls, settings: Settings) -> ReviewStore:
        """``DATABASE_URL``'s PostgreSQL when set, else ``MODEL_DIR/reviews.sqlite3``."""
        location = settings.database_url or settings.model_dir / "reviews.sqlite3"
        return cls(location, settings.calibration_min_reviews)

    def _add_columns(self, db) -> None:  # noqa: ANN001 -- sqlite3 or _Postgres
        for table, columns in _ADDED_COLUMNS.items():
            if self.postgres:
                for name, declaration in columns:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {declaration}")
                continue
            present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for name, declaration in columns:
                if name not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    def _begin(self) -> None:
        """Open a write transaction holding the store's write lock, or raise StoreBusy."""
        if not self.postgres:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreBusy(f"the {self.name} is locked by another process ({exc})") from None
            return
        import psycopg

        self._db.execute("BEGIN")
        try:
            self._db.execute(f"SET LOCAL lock_timeout = '{int(BUSY_TIMEOUT_SECONDS * 1000)}ms'")
            self._db.execute("SELECT pg_advisory_xact_lock(?)", (_WRITE_LOCK,))
        except psycopg.errors.LockNotAvailable:
            self._db.execute("ROLLBACK")
            raise StoreBusy(f"the {self.name} stayed locked by another process") from None

    @contextmanager
    def _writing(self) -> Iterator[Any]:
        """One write transaction, taken before reading (so read-then-write is atomic across processes)."""
        with self._lock:
            self._begin()
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def record_predictions(
        self, project: int, model_version: str, labels: Sequence[PredictedLabel], annotator: Sequence[float] = (),
        out_of_set: Sequence[str | None] = (), usage: Sequence[tuple[int, float, int, int, int]] = (),
    ) -> None:  # fmt: skip
        """Each predicted label's raw score, the annotator's own confidence in it, and the open-world answer it was
        mapped from when no label was similar enough (an out-of-set suggestion); and ``usage``, (task, model
        seconds, images, boxes, tokens) per predicted task for the cost report. One transaction per request."""
        confidences = list(annotator) or [None] * len(labels)
        suggestions = list(out_of_set) or [None] * len(labels)
        rows = [(project, p.task, p.region, p.control, p.label, p.raw, model_version, time.time(), a, s)
                for p, a, s in zip(labels, confidences, suggestions, strict=True)]  # fmt: skip
        with self._writing() as db:
            db.executemany("INSERT INTO predicted (project, task, region, control, label, raw, model_version, at, "
                           "annotator, out_of_set) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (project, task, "
                           "region, control, label) DO UPDATE SET raw = excluded.raw, model_version = "
                           "excluded.model_version, at = excluded.at, annotator = excluded.annotator, out_of_set = "
                           "excluded.out_of_set", rows)  # fmt: skip
            db.executemany(
                "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (project, task, model_version) "
                "DO UPDATE SET seconds = excluded.seconds, images = excluded.images, boxes = excluded.boxes, "
                "tokens = excluded.tokens, at = excluded.at",
                [(project, task, model_version, s, i, b, t, time.time()) for task, s, i, b, t in usage],
            )

    def suggestions(self, project: int, model_version: str | None = None) -> list[dict]:
        """The project's out-of-set answers (candidate new classes), most frequent first: the answer as first
        written, how many regions or images got it, the labels they were given instead, and some of their tasks."""
        rows = self._select("SELECT out_of_set, label, control, task FROM predicted WHERE project = ? AND "
                            "out_of_set IS NOT NULL", project, model_version)  # fmt: skip
        grouped: dict[str, dict] = {}
        for text, label, control, task in sorted(rows, key=lambda row: row[3]):
            entry = grouped.setdefault(text.strip().casefold(), {"text": text.strip(), "count": 0, "labelled_as": {},
                                                                 "controls": [], "tasks": []})  # fmt: skip
            entry["count"] += 1
            entry["labelled_as"][label] = entry["labelled_as"].get(label, 0) + 1
            if control not in entry["controls"]:
                entry["controls"].append(control)
            if task not in entry["tasks"] and len(entry["tasks"]) < SUGGESTION_TASKS:
                entry["tasks"].append(task)
        return sorted(grouped.values(), key=lambda entry: (-entry["count"], entry["text"]))

    def _select(self, query: str, project: int, model_version: str | None) -> list[tuple]:
        """Rows of ``query`` (filtered by project) for one model_version, or all when it is None."""
        params: tuple = (project,)
        if model_version is not None:
            query, params = query + " AND model_version = ?", (project, model_version)
        with self._lock:
            return self._db.execute(query, params).fetchall()

    def usage(self, project: int, model_version: str | None = None) -> list[dict]:
        rows = self._select("SELECT task, seconds, images, boxes, tokens FROM usage WHERE project = ?", project,
                            model_version)  # fmt: skip
        return [dict(zip(("task", "seconds", "images", "boxes", "tokens"), row, strict=True)) for row in rows]

    def annotator_task_scores(self, project: int, model_version: str | None = None) -> dict[int, float]:
        """Per task, P(all labels correct) from the annotator's own confidence alone (the baseline ranking)."""
        rows = self._select("SELECT task, annotator FROM predicted WHERE project = ? AND annotator IS NOT NULL",
                            project, model_version)  # fmt: skip
        scores: dict[int, float] = {}
        for task, confidence in rows:
            scores[task] = scores.get(task, 1.0) * confidence
        return scores

    def record_annotation(
        self, project: int, task: int, result: Sequence[dict[str, Any]], annotation: int | None = None
    ) -> int:
        """Record which of our labels for ``task`` the human kept (in ``annotation``); returns how many were judged."""
        with self._writing() as db:
            rows = db.execute(
                "SELECT task, region, control, label, raw FROM predicted WHERE project = ? AND task = ?",
                (project, task),
            ).fetchall()
            outcomes = review_outcomes([PredictedLabel(*row) for row in rows], result)
            db.execute("DELETE FROM reviewed WHERE project = ? AND task = ?", (project, task))
            db.executemany(
                "INSERT INTO reviewed VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (project, p.task, p.region, p.control, p.label, p.raw, int(kept), time.time(), annotation)
                    for p, kept in outcomes
                ],
            )
        return len(outcomes)

    def forget(self, project: int, *, task: int | None = None, annotation: int | None = None) -> None:
        """Drop the judgements of a deleted or skipped annotation, known by its task or (deletions) its id."""
        with self._writing() as db:
            if task is not None:
                db.execute("DELETE FROM reviewed WHERE project = ? AND task = ?", (project, task))
            if annotation is not None:
                db.execute("DELETE FROM reviewed WHERE project = ? AND annotation = ?", (project, annotation))

    def outcomes(self, project: int) -> tuple[list[float], list[bool]]:
        with self._lock:
            rows = self._db.execute("SELECT raw, survived FROM reviewed WHERE project = ?", (project,)).fetchall()
        return [r[0] for r in rows], [bool(r[1]) for r in rows]

    def inclusion(self, project: int) -> dict[int, float]:
        """Task → π for the tasks the project's latest review plan drew."""
        with self._lock:
            rows = self._db.execute("SELECT task, probability FROM inclusion WHERE project = ? AND selected = 1 AND "
                                    "plan = (SELECT MAX(plan) FROM plans WHERE project = ?)",
                                    (project, project)).fetchall()  # fmt: skip
        return {int(task): float(p) for task, p in rows}

    def record_plan(self, project: int, plan: ReviewPlan) -> int:
        """Keep a review plan's inclusion probabilities; returns the plan's number in the project (1, 2, ...)."""
        with self._writing() as db:
            query = "SELECT COALESCE(MAX(plan), 0) + 1 FROM plans WHERE project = ?"
            number = db.execute(query, (project,)).fetchone()[0]
            db.execute("INSERT INTO plans VALUES (?, ?, ?, ?, ?, ?)",
                       (project, number, plan.rule, plan.floor, plan.seed, time.time()))  # fmt: skip
            db.executemany("INSERT INTO inclusion VALUES (?, ?, ?, ?, ?, ?)",
                           [(project, number, i.task, i.score, i.probability, int(i.selected))
                            for i in plan.inclusion])  # fmt: skip
        return int(number)

    def sample_estimate(self, project: int, confidence: float = 0.95) -> dict[str, Any]:
        """The project's label accuracy estimated from the drawn tasks of its latest review plan that have been
        reviewed so far (inverse-probability weighted; see review_plan.estimate_accuracy)."""
        from backend.review_plan import estimate_accuracy

        with self._lock:
            plan = self._db.execute("SELECT plan, rule, floor FROM plans WHERE project = ? ORDER BY plan DESC LIMIT 1",
                                    (project,)).fetchone()  # fmt: skip
            if plan is None:
                return {"project": project, "plan_id": None, "error": "no review plan: run `mllm-backend review-plan`"}
            drawn = self._db.execute("SELECT COUNT(*) FROM inclusion WHERE project = ? AND plan = ? AND selected = 1",
                                     (project, plan[0])).fetchone()[0]  # fmt: skip
            rows = self._db.execute(
                "SELECT SUM(r.survived), COUNT(*), i.probability FROM inclusion i JOIN reviewed r ON r.project ="
                " i.project AND r.task = i.task WHERE i.project = ? AND i.plan = ? AND i.selected = 1"
                " GROUP BY i.task, i.probability",
                (project, plan[0])).fetchall()  # fmt: skip
        estimate = estimate_accuracy(correct=[r[0] for r in rows], labels=[r[1] for r in rows],
                                     probabilities=[r[2] for r in rows], confidence=confidence)  # fmt: skip
        return {"project": project, "plan_id": plan[0], "rule": plan[1], "floor": plan[2], "drawn_tasks": drawn,
                "reviewed_tasks": estimate.reviewed_tasks, "reviewed_labels": estimate.reviewed_labels,
                "complete": estimate.reviewed_tasks == drawn,
                "accuracy": {"value": estimate.value, "low": estimate.low, "high": estimate.high,
                             "confidence": confidence}}  # fmt: skip

    def _tally(self, project: int) -> tuple[int, int]:
        """(reviewed labels, labels kept) for a project, counted by the database."""
        with self._lock:
            count, kept = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(survived), 0) FROM reviewed WHERE project = ?", (project,)
            ).fetchone()
        return count, kept

    def _calibratable(self, count: int, kept: int) -> bool:
        return count >= self.min_reviews and 0 < kept < count

    def calibrator(self, project: int | None) -> Calibrator | None:
        """The project's fitted calibrator, or None while it has fewer than ``min_reviews`` reviewed labels.

        Called on every prediction: the rows are read and refitted only when the review tally changed.
        """
        if project is None:
            return None
        tally = self._tally(project)
        if not self._calibratable(*tally):
            return None
        cached = self._calibrators.get(project)
        if cached is None or cached[0] != tally:
            # Unweighted: a review sample is drawn by score, and a calibrator learns P(kept | score), which
            # selection by score does not bias; 1/π weights only added variance (quality report, tuning seeds).
            cached = (tally, Calibrator().fit(*self.outcomes(project)))
            self._calibrators[project] = cached
        return cached[1]

    def status(self) -> dict[str, Any]:
        with self._lock:
            projects = [r[0] for r in self._db.execute("SELECT DISTINCT project FROM reviewed").fetchall()]
        report = {}
        for project in projects:
            scores, kept = self.outcomes(project)
            entry: dict[str, Any] = {"reviewed_labels": len(scores), "survival_rate": round(sum(kept) / len(kept), 4)}
            if self.calibrator(project) is not None:
                entry.update(calibrated=True, ece_raw=round(expected_calibration_error(scores, kept), 4),
                             ece_calibrated=round(cross_fitted_ece(scores, kept), 4))  # fmt: skip
            else:
                entry.update(calibrated=False, needs=f"{self.min_reviews} reviewed labels with both outcomes")
            report[str(project)] = entry
        return report
