"""What Label Studio sends the backend, read once and checked at the door.

Each route reads its body through one function here. A field of the wrong type or out of
range is a :class:`BadRequest` naming the field and what Label Studio sends there, so the
route answers a clear 400 instead of failing somewhere deep inside. Ids are checked to fit
the 64-bit integers that Label Studio and SQLite store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_ID = 2**63 - 1  # Label Studio's ids are 64-bit integers, and so are SQLite's


class BadRequest(ValueError):
    """A request body the backend cannot act on; the message says which field and what it should be."""


class TaskError(ValueError):
    """One task cannot be read; the message says why. The other tasks of the request go on."""


def json_type(value: object) -> str:
    """What a JSON value is, in the words of JSON: "a string", "a list", "null" ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _refuse_constant(name: str) -> None:
    raise BadRequest(f"the request body contains {name}, which is not JSON; send numbers as finite values")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object: strict JSON (no NaN or Infinity), not nested past the parser's limit."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise BadRequest("the request body is nested too deeply to be a Label Studio request") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body is not a JSON object")
    return body


def label_studio_id(value: object) -> int | None:
    """``value`` as a Label Studio id (a whole number from 0 to 2^63 - 1), or None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_ID else None


def project_id(project: object) -> int | None:
    """The id in Label Studio's project field "<id>.<created_at epoch>" (or a bare id), or None."""
    if isinstance(project, int):
        return label_studio_id(project)
    head = project.split(".", 1)[0] if isinstance(project, str) else ""
    return label_studio_id(int(head)) if head.isascii() and head.isdigit() and len(head) <= 19 else None


def _optional_text(body: dict[str, Any], name: str, sent: str) -> str | None:
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    raise BadRequest(f"'{name}' is {json_type(value)}; Label Studio sends {sent}")


def _project_field(body: dict[str, Any]) -> str | None:
    project = body.get("project")
    if project is None or isinstance(project, str):
        return project
    if isinstance(project, int) and not isinstance(project, bool):
        return str(project)
    raise BadRequest(f"'project' is {json_type(project)}; Label Studio sends a string like \"12.1700000000\"")


@dataclass(frozen=True)
class PredictRequest:
    tasks: list[Any]  # each entry is checked on its own: a bad one fails only itself
    label_config: str
    project: str | None
    context: dict[str, Any] | None  # what the editor sent in interactive mode


def read_predict(body: dict[str, Any]) -> PredictRequest:
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise BadRequest("the request has no 'tasks' list; Label Studio sends {\"tasks\": [...], ...}")
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    context = params.get("context") if isinstance(params.get("context"), dict) else None
    config = _optional_text(body, "label_config", "the project's label config as an XML string") or ""
    return PredictRequest(tasks, config, _project_field(body), context)


@dataclass(frozen=True)
class SetupRequest:
    schema: str
    project: str | None
    hostname: str | None
    access_token: str | None


def read_setup(body: dict[str, Any]) -> SetupRequest:
    return SetupRequest(
        schema=_optional_text(body, "schema", "the project's label config as an XML string") or "",
        project=_project_field(body),
        hostname=_optional_text(body, "hostname", "Label Studio's URL as a string"),
        access_token=_optional_text(body, "access_token", "a token as a string"),
    )


def read_preannotate(body: dict[str, Any]) -> tuple[int, list[int] | None]:
    """(project id, task ids or None for every task) of ``POST /jobs/preannotate``."""
    usage = 'send {"project": <id>, "tasks": [<task id>, ...] or omitted for all}'
    project, tasks = label_studio_id(body.get("project")), body.get("tasks")
    if project is None:
        raise BadRequest(f"'project' is not a Label Studio project id; {usage}")
    if tasks is None:
        return project, None
    ids = [label_studio_id(t) for t in tasks] if isinstance(tasks, list) else [None]
    if any(i is None for i in ids):
        raise BadRequest(f"'tasks' is not a list of Label Studio task ids; {usage}")
    return project, [i for i in ids if i is not None]
