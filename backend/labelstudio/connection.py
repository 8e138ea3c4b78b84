"""What the backend checks and sets up in Label Studio once it is connected, in the background.

* :class:`KeyCheck`: does Label Studio accept the operator's key? ``/health`` (1 s budget) reads
  the last answer and never waits for a new one.
* :class:`ProjectSetup`: after a project's ``/setup``, the saved "Most suspicious first" tab, and
  the credentials Label Studio's own webhook to this backend lacks. Label Studio creates that
  webhook itself, with no headers, so under ``BASIC_AUTH_*`` (or ``WEBHOOK_SECRET``) its
  annotation events would get 401 and review outcomes and retraining would stop silently.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import OrderedDict
from urllib.parse import urlsplit

import requests

from backend.labelstudio.auth import KeyRefused, LabelStudioAuth, LabelStudioAuthError, is_personal_access_token
from backend.labelstudio.client import MAX_REMEMBERED, LabelStudioSites, connect, ensure_review_view
from backend.labelstudio.protocol import project_id
from backend.labelstudio.redirects import RedirectRefused
from backend.settings import Settings

log = logging.getLogger(__name__)
KEY_CHECK_SECONDS = 300.0  # how often the operator's key is checked again
RECHECK_SECONDS = 15.0  # sooner while the last check failed (Label Studio still starting, say)
WEBHOOK_WAIT_SECONDS = 60.0  # Label Studio creates its webhook only after /setup has answered


class KeyCheck:
    """Whether Label Studio accepts ``LABEL_STUDIO_API_KEY``, checked at start and every KEY_CHECK_SECONDS
    (every RECHECK_SECONDS while the last check failed).

    Two findings: ``problem`` is anything that stopped the check (for ``/health``); ``refused`` only
    Label Studio refusing the key, the one finding that makes posting hopeless. An unreachable Label
    Studio (it may start after the backend) is passing trouble, not a reason to give up on posting.
    """

    def __init__(self, auth: LabelStudioAuth | None) -> None:
        self._auth = auth
        self._problem: str | None = None
        self._refused = False

    def start(self) -> None:
        if self._auth is not None and self._auth.has_key:
            threading.Thread(target=self._loop, daemon=True, name="key-check").start()

    @property
    def problem(self) -> str | None:
        """Why the backend cannot use its key (None: it works, or it was not checked yet)."""
        return self._problem

    @property
    def refused(self) -> str | None:
        """Why Label Studio refuses the key (None: it has not, as far as the last check saw)."""
        return self._problem if self._refused else None

    def _loop(self) -> None:
        while True:
            self._problem, self._refused = self.check()
            if self._problem:
                log.warning("%s", self._problem)
            time.sleep(RECHECK_SECONDS if self._problem else KEY_CHECK_SECONDS)

    def check(self) -> tuple[str | None, bool]:
        """(what went wrong or None, whether it is Label Studio refusing the key)."""
        assert self._auth is not None
        url = f"{self._auth.base_url}/api/current-user/whoami"
        try:
            response = self._auth.session.get(url, headers=self._auth.headers(), timeout=10)
        except LabelStudioAuthError as exc:
            return str(exc), isinstance(exc, KeyRefused)
        except RedirectRefused as exc:  # another host's answer says nothing about the key
            return str(exc), False
        except requests.RequestException as exc:
            return (f"cannot reach Label Studio at {self._auth.base_url} ({type(exc).__name__}); check "
                    "LABEL_STUDIO_URL", False)  # fmt: skip
        if response.status_code in {401, 403}:
            return _refused(self._auth.base_url, self._auth.api_key or "", response.status_code), True
        if response.status_code != 200:
            return f"Label Studio at {self._auth.base_url} answered HTTP {response.status_code} to the key check", False
        return None, False


def _refused(base_url: str, key: str, status: int) -> str:
    if is_personal_access_token(key):
        return (f"Label Studio at {base_url} refused LABEL_STUDIO_API_KEY (HTTP {status}): the personal access token "
                "is revoked or from another instance; create a new one in Account & Settings")  # fmt: skip
    return (
        f"Label Studio at {base_url} refused LABEL_STUDIO_API_KEY (HTTP {status}). It is a legacy token, which "
        "organisations created by Label Studio 1.23 refuse unless it runs with LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"
        "=true: set LABEL_STUDIO_API_KEY to a personal access token (Account & Settings → Personal Access Token)"
    )


def webhook_headers(settings: Settings) -> dict[str, str]:
    """The headers Label Studio's webhook needs to pass this backend's auth (empty when none is on)."""
    headers: dict[str, str] = {}
    if settings.basic_auth is not None:
        user, password = settings.basic_auth
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    if settings.webhook_secret:
        headers["X-Webhook-Secret"] = settings.webhook_secret
    return headers


class ProjectSetup:
    """Per connected project, once per process: the review tab, and the webhook's headers.

    The webhook to patch is the one Label Studio made for this backend: ``<the URL it reaches us
    at>/webhook``, the URL read from the ``/setup`` request itself. Only that webhook gets the
    credentials, so they never go to another host (Label Studio already sends them there with
    every ``/predict``). What could not be done is kept per project for ``/health``.
    """

    def __init__(self, settings: Settings, sites: LabelStudioSites) -> None:
        self._settings = settings
        self._sites = sites
        self._headers = webhook_headers(settings)
        self._started: set[str] = set()
        self._problems: OrderedDict[int, str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def problems(self) -> list[str]:
        with self._lock:
            return list(self._problems.values())[-5:]

    def request(self, project: str, backend_url: str) -> threading.Thread | None:
        """Set up ``project`` in the background, unless done (or under way) in this process already."""
        pid = project_id(project)
        if pid is None or (not self._headers and not self._settings.review_tab):
            return None
        site = self._sites.for_project(project)
        with self._lock:
            if project in self._started:
                return None
            self._started.add(project)
            while len(self._started) > MAX_REMEMBERED:
                self._started.pop()
        if site is None or not site.has_key:
            if self._headers:
                self._problem(pid, (
                    f"project {pid}: Label Studio's webhook to this backend carries no credentials and gets 401 "
                    "(BASIC_AUTH_* or WEBHOOK_SECRET is on), so review outcomes and retraining after annotations "
                    "stop; set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY so the backend adds them, or add the "
                    "header by hand in the project's Settings → Webhooks"))  # fmt: skip
            return None
        thread = threading.Thread(target=self._set_up, args=(project, pid, site, backend_url), daemon=True)
        thread.start()
        return thread

    def _problem(self, pid: int, message: str) -> None:
        log.warning("%s", message)
        with self._lock:
            self._problems[pid] = message
            while len(self._problems) > 100:
                self._problems.popitem(last=False)

    def _set_up(self, project: str, pid: int, site: LabelStudioAuth, backend_url: str) -> None:
        try:
            client = connect(site.base_url, site.api_key or "")
            if self._settings.review_tab:
                ensure_review_view(client, pid)
            if self._headers:
                self._patch_webhook(client, pid, backend_url)
        except Exception as exc:  # a failure here must never reach a request; it is reported in /health
            with self._lock:
                self._started.discard(project)  # the next /setup tries again
            detail = str(exc) if isinstance(exc, (LabelStudioAuthError, RedirectRefused)) else type(exc).__name__
            self._problem(pid, f"project {pid}: could not set up the review tab and webhook in Label Studio "
                               f"({detail})")  # fmt: skip
            return
        with self._lock:
            self._problems.pop(pid, None)

    def _patch_webhook(self, client, pid: int, backend_url: str) -> None:
        target = _without_scheme(backend_url.rstrip("/") + "/webhook")
        ends = time.monotonic() + WEBHOOK_WAIT_SECONDS
        while True:
            hooks = [h for h in client.webhooks.list(project=str(pid)) if _without_scheme(h.url or "") == target]
            if hooks:
                break
            if time.monotonic() > ends:
                self._problem(pid, (
                    f"project {pid}: found no webhook to {target} to give its credentials (behind a proxy, Label "
                    "Studio may reach this backend under another address); add the header by hand in the "
                    "project's Settings → Webhooks, or annotation events get 401"))  # fmt: skip
                return
            time.sleep(2.0)
        for hook in hooks:
            current = dict(hook.headers or {}) if isinstance(hook.headers, dict) else {}
            if any(current.get(name) != value for name, value in self._headers.items()):
                client.webhooks.update(id=hook.id, headers={**current, **self._headers})
                log.info("project %s: gave Label Studio's webhook %s the headers it needs", pid, hook.id)


def _without_scheme(url: str) -> str:
    """``host:port/path`` of a URL: Label Studio may reach us over https through a proxy that speaks http to us."""
    parts = urlsplit(url)
    return f"{(parts.hostname or '').lower()}:{parts.port or ''}{parts.path.rstrip('/')}"
