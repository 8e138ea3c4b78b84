"""The HTTP protocol Label Studio 1.23 speaks to an ML backend. Routes only."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request

from backend.jobs import QueueUnavailable
from backend.labelstudio.client import SetupInfo
from backend.labelstudio.config import UnsupportedConfig, parse_label_config
from backend.metrics import CONTENT_TYPE
from backend.models.slot import ModelNotReady
from backend.prompts import PromptError
from backend.service import Service
from backend.webhooks import handle_webhook

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 256 * 1024 * 1024
RETRY_AFTER_SECONDS = "10"


def _error(message: str, status: int, **headers: str) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    response.headers.update(headers)
    return response


def _json_object() -> dict[str, Any] | Response:
    body = request.get_json(silent=True, force=True)
    if not isinstance(body, dict):
        return _error("the request body is not a JSON object", 400)
    return body


def create_app(service: Service) -> Flask:
    app = Flask("mllm-backend")
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    settings, predictor, metrics = service.settings, service.predictor, service.metrics
    admission = threading.BoundedSemaphore(settings.max_predicts_in_flight)  # overload: a fast 503, not a timeout
    service.slot.start()
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
        if credentials is None or request.path == "/health":
            return None
        auth = request.authorization
        given_user = (auth.username or "") if auth else ""
        given_pass = (auth.password or "") if auth else ""
        user_ok = hmac.compare_digest(given_user.encode(), credentials[0].encode())
        pass_ok = hmac.compare_digest(given_pass.encode(), credentials[1].encode())
        if user_ok and pass_ok:
            return None
        return _error(
            "basic auth required: set the ML backend's Basic Auth user and password in Label Studio",
            401,
            **{"WWW-Authenticate": 'Basic realm="mllm-backend"'},
        )

    @app.after_request
    def count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(route=route, method=request.method, status=str(response.status_code)).inc()
        metrics.latency.labels(route=route).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    @app.errorhandler(413)
    def too_large(_: Exception) -> Response:
        return _error(f"the request is over {MAX_REQUEST_BYTES} bytes; send fewer tasks per request", 413)

    @app.get("/health")
    def health() -> Response | tuple[Response, int]:
        state = service.slot.state
        metrics.model_ready.set(1 if state == "ready" else 0)
        body = {
            "status": "UP",
            "model_state": state,
            "model": settings.mllm_model,
            "model_version": predictor.model_version(),
            # Projects whose scores are calibrated on their own review outcomes; elsewhere scores are raw fusions.
            "calibrated_projects": predictor.reviews.calibrated_projects(),
            "jobs": service.jobs.kind,  # "redis": rq workers; "in-process": a thread of this server
        }
        problem = service.jobs.problem() if hasattr(service.jobs, "problem") else None
        if problem:
            body.update(degraded=True, problem=problem)  # still serving predictions; background work is not queued
        if state == "failed":
            return jsonify({**body, "status": "DOWN", "error": service.slot.error}), 503
        return jsonify(body)

    @app.post("/setup")
    def setup() -> Response:
        body = _json_object()
        if isinstance(body, Response):
            return body
        try:
            parse_label_config(body.get("schema") or "")
            version = predictor.model_version()
        except (UnsupportedConfig, PromptError) as exc:
            return _error(str(exc), 400)
        project = str(body.get("project") or "")
        service.sites.remember(project, SetupInfo(body.get("hostname"), body.get("access_token")))
        service.version_sync.request(project, version)
        return jsonify({"model_version": version})

    @app.post("/predict")
    def predict() -> Response:
        body = _json_object()
        if isinstance(body, Response):
            return body
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            return _error("the request has no 'tasks' list; Label Studio sends {\"tasks\": [...], ...}", 400)
        if len(tasks) > settings.max_tasks_per_request:
            return _error(
                f"{len(tasks)} tasks in one request is over MAX_TASKS_PER_REQUEST={settings.max_tasks_per_request}: "
                "select fewer tasks, or pre-annotate the whole project in the background with "
                'POST /jobs/preannotate {"project": <id>} (or `mllm-backend preannotate --project <id>`)',
                413,
            )
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        context = params.get("context") if isinstance(params.get("context"), dict) else None
        if not admission.acquire(blocking=False):
            metrics.task_errors.labels(reason="overload").inc(len(tasks))
            return _error(
                f"the backend is busy ({settings.max_predicts_in_flight} predictions in flight); retry shortly",
                503, **{"Retry-After": "2"},
            )  # fmt: skip
        try:
            results = predictor.predict(tasks, body.get("label_config") or "", body.get("project"), context)
        except UnsupportedConfig as exc:
            return _error(str(exc), 400)
        except ModelNotReady as exc:
            return _error(str(exc), 503, **{"Retry-After": RETRY_AFTER_SECONDS})
        except PromptError as exc:
            return _error(str(exc), 500)
        finally:
            admission.release()
        version = predictor.model_version()
        if any(isinstance(r, dict) and "result" in r for r in results):
            service.version_sync.request(str(body.get("project") or ""), version)
        return jsonify({"results": results, "model_version": version})

    @app.post("/webhook")
    def webhook() -> Response:
        body = _json_object()
        if isinstance(body, Response):
            return body
        action = str(body.get("action") or "")
        try:
            judged, job = handle_webhook(predictor.reviews, service.jobs, action, body)
        except QueueUnavailable as exc:
            log.error("webhook %s: %s", action, exc)
            return _error(f"{exc}; the event was not queued, retry it or press Start training", 503)
        log.info("webhook %s acknowledged (%d labels judged, job %s)", action or "(no action)", judged, job)
        return jsonify({"status": "ok", "action": action, "judged_labels": judged, "job": job})

    @app.get("/jobs/<job_id>")
    def job_status(job_id: str) -> Response:
        try:
            status = service.jobs.status(job_id)
        except QueueUnavailable as exc:
            return _error(str(exc), 503)
        return jsonify(status) if status is not None else _error(f"no job {job_id}", 404)

    @app.post("/jobs/preannotate")
    def preannotate() -> Response:
        body = _json_object()
        if isinstance(body, Response):
            return body
        project, tasks = body.get("project"), body.get("tasks")
        if not isinstance(project, int) or not (tasks is None or all(isinstance(t, int) for t in tasks)):
            return _error('send {"project": <id>, "tasks": [<task id>, ...] or omitted for all}', 400)
        try:
            return jsonify({"job": service.jobs.preannotate(project, tasks)})
        except QueueUnavailable as exc:
            return _error(str(exc), 503)

    @app.get("/versions")
    def versions() -> Response:
        version = predictor.model_version()
        classifiers = {str(p): service.versions.versions(p) for p in service.versions.projects()}
        return jsonify({"versions": [version], "model_version": version, "calibration": predictor.reviews.status(),
                        "classifiers": classifiers})  # fmt: skip

    @app.get("/metrics")
    def prometheus() -> Response:
        metrics.model_ready.set(1 if service.slot.state == "ready" else 0)
        return Response(metrics.render(), content_type=CONTENT_TYPE)

    return app
