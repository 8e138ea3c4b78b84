"""The HTTP protocol Label Studio 1.23 speaks to an ML backend. Routes only."""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from backend.deadline import deadline
from backend.jobs import QueueUnavailable
from backend.labelstudio.client import ModelVersionSync, SetupInfo
from backend.labelstudio.config import UnsupportedConfig
from backend.labelstudio.protocol import (
    BadRequest,
    label_studio_id,
    parse_json,
    read_preannotate,
    read_predict,
    read_setup,
)
from backend.models.engine import Engine
from backend.models.slot import ModelNotReady
from backend.preannotate import hand_over
from backend.prompts import PromptError
from backend.reviews import StoreBusy
from backend.service import Service
from backend.telemetry import CONTENT_TYPE
from backend.webhooks import handle_webhook

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 256 * 1024 * 1024
RETRY_AFTER_SECONDS = "10"

# What each failure means to the caller: (exception, HTTP status, extra headers). The message is the exception's own.
ERRORS: tuple[tuple[type[Exception], int, dict[str, str]], ...] = (
    (BadRequest, 400, {}),
    (UnsupportedConfig, 400, {}),
    (ModelNotReady, 503, {"Retry-After": RETRY_AFTER_SECONDS}),
    (QueueUnavailable, 503, {"Retry-After": RETRY_AFTER_SECONDS}),
    (StoreBusy, 503, {"Retry-After": "1"}),
    (PromptError, 500, {}),  # the operator's prompt files are broken: no request can fix that
)


class _StrictJSON(DefaultJSONProvider):
    """Responses are strict JSON: a NaN or infinity is a bug to fail loudly on, never a bare NaN for the caller."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return super().dumps(obj, allow_nan=False, **kwargs)


REASON_MAX_CHARS = 600
_TAG = re.compile(r"<(/?[A-Za-z][\w.-]{0,40})>")


def _error(message: str, status: int, **headers: str) -> Response:
    """A JSON error whose message is also the status line's reason phrase: Label Studio shows a backend's refusal
    as ``str(HTTPError)`` ("400 Client Error: <reason> for url: ..."), never the body."""
    response = jsonify({"error": message})
    response.status = f"{status} {reason_phrase(message)}"
    response.headers.update(headers)
    return response


def reason_phrase(message: str) -> str:
    """``message`` as an HTTP reason phrase: printable ASCII on one line (RFC 9112), at most REASON_MAX_CHARS.

    Label Studio's connect dialog renders the phrase as HTML, where "<Audio>" would vanish as a tag:
    tag names lose their brackets ("Audio"), and any other angle bracket goes."""
    message = _TAG.sub(r"\1", message).replace("<", " ").replace(">", " ")
    flat = "".join(c if " " <= c <= "~" else "?" if c > "~" else " " for c in message)
    flat = " ".join(flat.split())
    return flat if len(flat) <= REASON_MAX_CHARS else flat[: REASON_MAX_CHARS - 3] + "..."


def _json_object() -> dict[str, Any]:
    """The request body as a JSON object, or BadRequest (answered 400 by the error table)."""
    return parse_json(request.get_data(cache=False))


def _register_errors(app: Flask) -> None:
    for exception, status, headers in ERRORS:
        app.register_error_handler(
            exception, lambda exc, status=status, headers=headers: _error(str(exc), status, **headers)
        )

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:  # 404, 405, 413 ... as JSON, never Werkzeug's HTML page
        if exc.code == 413:
            return _error(f"the request is over {MAX_REQUEST_BYTES} bytes; send fewer tasks per request", 413)
        return _error(f"{exc.name}: {exc.description}", exc.code or 500)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:  # a bug: logged with its traceback, answered without one
        log.exception("%s %s failed", request.method, request.path)
        return _error(f"internal error ({type(exc).__name__}); the backend's log has the details", 500)


def create_app(service: Service) -> Flask:
    app = Flask("mllm-backend")
    app.json = _StrictJSON(app)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    _register_errors(app)
    settings, predictor, telemetry = service.settings, service.predictor, service.telemetry
    admission = threading.BoundedSemaphore(settings.max_predicts_in_flight)  # overload: a fast 503, not a timeout
    limits = (f"PREDICT_DEADLINE_SECONDS={settings.predict_deadline_seconds:g}, "
              f"MAX_TASKS_PER_REQUEST={settings.max_tasks_per_request}")  # fmt: skip
    service.slot.start()
    service.key_check.start()
    if predictor.critic_slot is not None:
        predictor.critic_slot.start()

    @app.before_request
    def authenticate() -> Response | None:
        g.started = time.perf_counter()
        if request.path == "/webhook" and settings.webhook_secret:
            given = request.headers.get("X-Webhook-Secret", "")
            if hmac.compare_digest(given.encode(), settings.webhook_secret.encode()):
                return None
            return _error("the webhook secret is missing or wrong: add the header X-Webhook-Secret to the webhook "
                          "in Label Studio (Settings → Webhooks)", 401)  # fmt: skip
        credentials = settings.basic_auth
        g.authenticated = credentials is not None and _basic_auth_matches(credentials)
        if credentials is None or g.authenticated or request.path in {"/health", "/"}:
            return None
        return _error(
            "basic auth required: set the ML backend's Basic Auth user and password in Label Studio",
            401,
            **{"WWW-Authenticate": 'Basic realm="mllm-backend"'},
        )

    @app.after_request
    def count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        telemetry.requests.labels(route=route, method=request.method, status=str(response.status_code)).inc()
        telemetry.latency.labels(route=route).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    @app.get("/")
    @app.get("/health")
    def health() -> Response | tuple[Response, int]:
        """Label Studio gives this 1 s: nothing here waits on the model, SQLite, Label Studio or a lock held by
        predictions (the key check and project set-up run in the background and leave their findings)."""
        state = service.slot.state
        telemetry.model_ready.set(1 if state == "ready" else 0)
        problems = [service.jobs.problem(), service.key_check.problem, *service.project_setup.problems,
                    *service.version_sync.problems, *_coarse_scores(), *_prefix_stores()]  # fmt: skip
        body: dict[str, Any] = {"status": "UP", "model_state": state, "model_version": predictor.model_version(),
                                "warnings": list(dict.fromkeys(p for p in problems if p))}  # fmt: skip
        if g.get("authenticated"):  # what the deployment looks like, only for a caller who proved who they are
            body.update(model=settings.mllm_model, jobs=service.jobs.kind)
        if state == "failed":
            return jsonify({**body, "status": "DOWN", "error": service.slot.error}), 503
        return jsonify(body)

    def _engines() -> dict[str, Engine]:
        """The loaded engines by role, without waiting for one that is loading."""
        engines = {"annotator": service.slot.loaded, "critic": getattr(predictor.critic_slot, "loaded", None)}
        return {role: engine for role, engine in engines.items() if engine is not None}

    def _coarse_scores() -> list[str]:
        return [f"the {role} ({engine.name}) scores by sampling agreement: {engine.scoring_reason}; its scores are "
                "coarse (a few answers per question). Serve it with vLLM or SGLang for full-label scores"
                for role, engine in _engines().items() if engine.scoring_method == "agreement"]  # fmt: skip

    def _prefix_stores() -> list[str]:
        stores = {role: getattr(engine, "image_prefixes", None) for role, engine in _engines().items()}
        return [
            f"the {role}: {problem}"
            for role, store in stores.items()
            if store is not None and (problem := store.problem())
        ]

    @app.post("/setup")
    def setup() -> Response:
        setup = read_setup(_json_object())
        predictor.spec(setup.schema)
        version = predictor.model_version()
        project = setup.project or ""
        service.sites.remember(project, SetupInfo(setup.hostname, setup.access_token))
        service.version_sync.request(project, version)
        service.project_setup.request(project, request.url_root)  # the address Label Studio reaches us at
        return jsonify({"model_version": version})

    @app.post("/predict")
    def predict() -> Response:
        asked = read_predict(_json_object())
        now = asked.tasks[: settings.max_tasks_per_request]  # the rest go to a background job (hand_over)
        if not admission.acquire(blocking=False):
            telemetry.task_errors.labels(reason="overload").inc(len(asked.tasks))
            return _error(
                f"the backend is busy ({settings.max_predicts_in_flight} predictions in flight); retry shortly",
                503, **{"Retry-After": "2"},
            )  # fmt: skip
        try:
            with deadline(settings.predict_deadline_seconds):
                answer = service.annotator.answer(now, asked.label_config, project=asked.project,
                                                  context=asked.context)  # fmt: skip
        finally:
            admission.release()
        version = answer.model_version
        results: list[dict | list] = [*answer.predictions, *([] for _ in asked.tasks[len(now) :])]
        if asked.context is not None and len(results) == 1 and isinstance(results[0], dict) and "error" in results[0]:
            # interactive: Label Studio's editor shows an HTTP error's status line, and nothing for an error body
            return _error(results[0]["error"], 422)
        later = [*answer.late, *range(len(now), len(asked.tasks))]
        job = None
        if later:
            answers, job = hand_over(asked.tasks, later, project=asked.project, jobs=service.jobs,
                                     cannot_post=_cannot_post(), model_version=version, limits=limits)  # fmt: skip
            for position, answered in answers.items():
                results[position] = answered
        if any(isinstance(r, dict) and "result" in r for r in results):
            service.version_sync.request(asked.project or "", version, patience=ModelVersionSync.PREDICT_PATIENCE)
        return jsonify({"results": results, "model_version": version, **({"job": job} if job else {})})

    def _cannot_post() -> str | None:
        """Why a background job could not post predictions to Label Studio (None: it can)."""
        if not (settings.label_studio_url and settings.label_studio_api_key):
            return ("the backend has no Label Studio key to post predictions with; set LABEL_STUDIO_URL and "
                    "LABEL_STUDIO_API_KEY, or select fewer tasks")  # fmt: skip
        return service.key_check.refused  # not reaching Label Studio is passing trouble: /jobs tells if it lasts

    @app.post("/webhook")
    def webhook() -> Response:
        body = _json_object()
        action = str(body.get("action") or "")[:100]
        try:
            judged, job = handle_webhook(predictor.reviews, service.jobs, action, body)
        except QueueUnavailable as exc:
            log.error("webhook %s: %s", action, exc)
            return _error(f"{exc}; the event was not queued, retry it or press Start training", 503)
        log.info("webhook %s acknowledged (%d labels judged, job %s)", action or "(no action)", judged, job)
        return jsonify({"status": "ok", "action": action, "judged_labels": judged, "job": job})

    @app.get("/jobs/<job_id>")
    def job_status(job_id: str) -> Response:
        status = service.jobs.status(job_id)
        return jsonify(status) if status is not None else _error(f"no job {job_id[:100]}", 404)

    @app.get("/jobs")
    def jobs_of_project() -> Response:
        project = label_studio_id(request.args.get("project", type=int))
        if project is None:
            return _error("name the project: GET /jobs?project=<id>", 400)
        return jsonify({"jobs": [s for j in service.jobs.recent(project) if (s := service.jobs.status(j))]})

    @app.get("/suggestions")
    def suggestions() -> Response:
        project = label_studio_id(request.args.get("project", type=int))
        if project is None:
            return _error("name the project: GET /suggestions?project=<id>[&model_version=<version>]", 400)
        version = request.args.get("model_version") or None
        return jsonify({"project": project, "model_version": version,
                        "suggestions": predictor.reviews.suggestions(project, version)})  # fmt: skip

    @app.post("/jobs/preannotate")
    def preannotate() -> Response:
        project, tasks = read_preannotate(_json_object())
        return jsonify({"job": service.jobs.preannotate(project, tasks)})

    @app.get("/versions")
    def versions() -> Response:
        version = predictor.model_version()
        classifiers = {str(p): service.classifiers.versions(p) for p in service.classifiers.projects()}
        return jsonify({"versions": [version], "model_version": version, "model": settings.mllm_model,
                        "jobs": service.jobs.kind, "calibration": predictor.reviews.status(),
                        "classifiers": classifiers, "scoring": {role: {"method": e.scoring_method, "why":
                        e.scoring_reason} for role, e in _engines().items()}})  # fmt: skip

    @app.get("/metrics")
    def prometheus() -> Response:
        telemetry.model_ready.set(1 if service.slot.state == "ready" else 0)
        return Response(telemetry.render(), content_type=CONTENT_TYPE)

    return app


def _basic_auth_matches(credentials: tuple[str, str]) -> bool:
    auth = request.authorization
    given_user = (auth.username or "") if auth else ""
    given_pass = (auth.password or "") if auth else ""
    user_ok = hmac.compare_digest(given_user.encode(), credentials[0].encode())
    pass_ok = hmac.compare_digest(given_pass.encode(), credentials[1].encode())
    return user_ok and pass_ok
