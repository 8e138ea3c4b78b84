"""Which Label Studio a project lives in, and the few API calls the backend makes to it."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from backend.labelstudio.auth import LabelStudioAuth
from backend.labelstudio.protocol import project_id
from backend.labelstudio.redirects import RedirectRefused, same_origin_httpx_client

log = logging.getLogger(__name__)
MAX_REMEMBERED = 10_000  # projects (and Label Studio sites) kept from /setup; the oldest are forgotten first


@dataclass(frozen=True)
class SetupInfo:
    """What Label Studio told us in POST /setup about a project."""

    hostname: str | None
    access_token: str | None


class LabelStudioSites:
    """Resolves a project's Label Studio URL and key.

    With ``LABEL_STUDIO_URL`` set, every project lives there, and the operator's key (or,
    without one, the token that project's ``/setup`` carried) goes there and nowhere else.
    Without it, a project's ``/setup`` names its host, and only the token that came with
    that ``/setup`` goes to it: the operator's key never follows a host a request names
    (settings refuse a key without a URL).
    """

    def __init__(self, url: str | None, api_key: str | None) -> None:
        self._url = url
        self._key = api_key
        self._setups: OrderedDict[str, SetupInfo] = OrderedDict()
        self._auths: OrderedDict[tuple[str, str | None], LabelStudioAuth] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, project: str, info: SetupInfo) -> None:
        with self._lock:
            self._setups[project] = info
            self._setups.move_to_end(project)
            while len(self._setups) > MAX_REMEMBERED:  # /setup may be called by anyone who reaches the port
                self._setups.popitem(last=False)

    def for_project(self, project: str | None) -> LabelStudioAuth | None:
        with self._lock:
            info = self._setups.get(project or "") or SetupInfo(None, None)
            if self._url:
                base, key = self._url, self._key or info.access_token
            else:
                base, key = info.hostname, info.access_token
            if not base:
                return None
            cache_key = (base.rstrip("/"), key)
            if cache_key not in self._auths:
                self._auths[cache_key] = LabelStudioAuth(base, key)
                while len(self._auths) > MAX_REMEMBERED:
                    self._auths.popitem(last=False)
            return self._auths[cache_key]


class ModelVersionSync:
    """Makes each project's ``model_version`` equal ours, so "Prediction score" sorting works.

    Label Studio averages ``prediction.score`` only over predictions whose model_version
    equals the project's, and connecting a backend sets the project's to the backend's
    title. Label Studio refuses a model_version that neither a connected backend nor a
    stored prediction carries yet, and stores a retrieval's predictions only after
    ``/predict`` answers, which with a real model can take minutes. So each request asks
    for ``patience`` seconds of trying; a request while a sync runs extends that sync
    (never dropped), and it tries with growing pauses until Label Studio takes the version
    or the latest patience runs out. One background thread per project at a time.
    """

    DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0)  # then every 15 s
    SETUP_PATIENCE = 30.0  # /setup: before any prediction exists, only a stored one can make the version valid
    PREDICT_PATIENCE = 180.0  # after /predict answers, Label Studio stores its predictions

    def __init__(self, sites: LabelStudioSites, enabled: bool = True) -> None:
        self._sites = sites
        self._enabled = enabled
        self._wanted: dict[str, tuple[str, float]] = {}  # project -> (model_version, keep trying until)
        self._problems: OrderedDict[int, str] = OrderedDict()  # project id -> why its last sync gave up
        self._lock = threading.Lock()

    @property
    def problems(self) -> list[str]:
        """Why the latest syncs that gave up did (for ``/health``); a project's entry goes when it syncs."""
        with self._lock:
            return list(self._problems.values())[-5:]

    def request(self, project: str, model_version: str, patience: float = SETUP_PATIENCE) -> threading.Thread | None:
        """Start (or extend) the project's sync; returns the thread it started, if any."""
        pid = project_id(project)
        site = self._sites.for_project(project)
        if not self._enabled or pid is None or site is None or not site.has_key:
            return None
        with self._lock:
            until = time.monotonic() + patience
            running = project in self._wanted
            if running:
                until = max(until, self._wanted[project][1])
            self._wanted[project] = (model_version, until)
            if running:
                return None
        thread = threading.Thread(target=self._sync, args=(project, site, pid), daemon=True)
        thread.start()
        return thread

    def _sync(self, project: str, site: LabelStudioAuth, pid: int) -> None:
        attempt, error, client = 0, "none", None
        while True:
            with self._lock:
                version, _ = self._wanted[project]
            try:  # never let a sync failure touch a request
                client = client or connect(site.base_url, site.api_key or "")
                set_model_version(client, pid, version)
            except RedirectRefused as exc:
                error = str(exc)
            except Exception as exc:
                error = type(exc).__name__
            else:
                with self._lock:
                    self._problems.pop(pid, None)
                    if self._wanted[project][0] == version:  # else a newer version was asked for meanwhile
                        del self._wanted[project]
                        return
                continue
            delay = self.DELAYS[min(attempt, len(self.DELAYS) - 1)]
            attempt += 1
            with self._lock:
                if time.monotonic() + delay > self._wanted[project][1]:
                    del self._wanted[project]
                    self._give_up(pid, f"could not set project {pid} model_version after {attempt} tries ({error}): "
                                       "sorting by Prediction score needs it")  # fmt: skip
                    return
            time.sleep(delay)

    def _give_up(self, pid: int, message: str) -> None:
        """Called with the lock held."""
        log.warning("%s", message)
        self._problems[pid] = message
        self._problems.move_to_end(pid)
        while len(self._problems) > 100:
            self._problems.popitem(last=False)


def set_model_version(client, project: int, version: str) -> None:
    """Make the project's model_version ``version`` (a no-op when it is); raises what the SDK raises, e.g. while
    Label Studio refuses a version no prediction carries yet."""
    if client.projects.get(project).model_version != version:
        client.projects.update(id=project, model_version=version)
        log.info("set project %s model_version to %s", project, version)


REVIEW_VIEW_TITLE = "Most suspicious first"
DISAGREEMENT_VIEW_TITLE = "Model and person disagree"
SAMPLE_VIEW_TITLE = "Review sample"
SUSPICION_ORDER = "tasks:predictions_score"  # the Data Manager's "Prediction score" column, ascending


def connect(url: str, api_key: str, timeout: float = 60.0):
    """A label-studio-sdk client (legacy token or personal access token) whose requests, the SDK's own token
    refresh included, follow redirects only on Label Studio's origin (:mod:`backend.labelstudio.redirects`)."""
    from label_studio_sdk import LabelStudio

    http = same_origin_httpx_client(url, timeout)
    return LabelStudio(base_url=url, api_key=api_key, timeout=timeout, httpx_client=http)


def project_tasks(client, project: int) -> list[dict]:
    """Every task of the project as a plain dict, with its full annotations and predictions inline."""
    return [t.dict() if hasattr(t, "dict") else dict(t) for t in client.tasks.list(project=project, fields="all")]


def tasks_by_id(client, project: int, task_ids: list[int]) -> list[dict]:
    """These tasks of the project as plain dicts (annotations and predictions inline), in one Data Manager
    selection rather than one request per task."""
    # Label Studio reads a GET's selection from its "query" parameter (data_manager.functions.get_prepare_params)
    query = json.dumps({"selectedItems": {"all": False, "included": [int(i) for i in task_ids]}})
    tasks = client.tasks.list(project=project, fields="all", query=query)
    return [t.dict() if hasattr(t, "dict") else dict(t) for t in tasks]


def prediction_scores(client, project: int, model_version: str) -> list[tuple[int, float]]:
    """(task id, score) of every task that has a scored prediction from ``model_version``."""
    scores = []
    for task in project_tasks(client, project):
        for prediction in task.get("predictions") or []:
            if prediction.get("model_version") == model_version and prediction.get("score") is not None:
                scores.append((int(task["id"]), float(prediction["score"])))
                break
    return scores


# Label Studio 1.23's Data Manager columns hidden by default, less "Prediction score" (data_manager/functions.py).
_HIDDEN_IN_REVIEW = tuple(f"tasks:{c}" for c in (
    "inner_id", "annotations_results", "annotations_ids", "predictions_model_versions", "predictions_results",
    "file_upload", "storage_filename", "created_at", "updated_at", "updated_by", "avg_lead_time", "draft_exists",
))  # fmt: skip
_HIDDEN_WHILE_LABELING = ("tasks:completed_at", "tasks:cancelled_annotations", "tasks:total_predictions",
                          "tasks:annotators")  # fmt: skip


def create_review_view(client, project: int) -> int:
    """A saved Data Manager tab ordered by prediction score, ascending (most suspicious first), with the
    "Prediction score" column shown: Label Studio hides it by default."""
    hidden = {"explore": list(_HIDDEN_IN_REVIEW), "labeling": [*_HIDDEN_IN_REVIEW, *_HIDDEN_WHILE_LABELING]}
    view = client.views.create(
        project=project,
        data={"title": REVIEW_VIEW_TITLE, "ordering": [SUSPICION_ORDER], "hiddenColumns": hidden},
    )
    return int(view.id)


def ensure_review_view(client, project: int) -> int:
    """The project's "Most suspicious first" tab: the existing one, or a new one."""
    view = _view_titled(client, project, REVIEW_VIEW_TITLE)
    return int(view.id) if view is not None else create_review_view(client, project)


def _view_titled(client, project: int, title: str):
    """The project's saved Data Manager tab with this title, or None."""
    return next((view for view in client.views.list(project=project)
                 if isinstance(view.data, dict) and view.data.get("title") == title), None)  # fmt: skip


def disagreement_view(client, project: int, task_ids: list[int]) -> int:
    """The project's "Model and person disagree" tab, listing exactly ``task_ids``: the tasks to annotate again
    (the CelebA study's protocol: re-annotate where the MLLM and the human differ, then vote)."""
    return _task_list_view(client, project, DISAGREEMENT_VIEW_TITLE, task_ids)


def sample_view(client, project: int, task_ids: list[int]) -> int:
    """The project's "Review sample" tab, listing exactly the tasks the latest review plan drew."""
    return _task_list_view(client, project, SAMPLE_VIEW_TITLE, task_ids)


def _task_list_view(client, project: int, title: str, task_ids: list[int]) -> int:
    """The project's tab ``title``, made or updated to list exactly ``task_ids``, most suspicious first."""
    ids = sorted(set(task_ids)) or [0]  # no task has id 0: an empty tab
    items = [{"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": task} for task in ids]
    data = {"title": title, "filters": {"conjunction": "or", "items": items}, "ordering": [SUSPICION_ORDER]}
    view = _view_titled(client, project, title)
    if view is None:
        return int(client.views.create(project=project, data=data).id)
    client.views.update(id=view.id, project=project, data={**view.data, **data})
    return int(view.id)
