"""Authenticating to Label Studio with a legacy token or a personal access token (PAT).

A legacy token is sent as ``Authorization: Token <key>``. A PAT is a JWT refresh
token: it is exchanged at ``/api/token/refresh/`` for an access token that lives
about five minutes and is sent as ``Authorization: Bearer <access>``.
"""

from __future__ import annotations

import base64
import json
import threading
import time

import requests

from backend.labelstudio.redirects import RedirectRefused, same_origin_session

ACCESS_TOKEN_REUSE_SECONDS = 240  # access tokens live 300 s; refresh a little early


class LabelStudioAuthError(RuntimeError):
    """No access token could be had for the configured key; the message never contains the key."""


class KeyRefused(LabelStudioAuthError):
    """Label Studio refused the key itself (not a network failure on the way)."""


def is_personal_access_token(key: str) -> bool:
    parts = key.split(".")
    if len(parts) != 3:
        return False
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(payload, dict) and payload.get("token_type") == "refresh"


class LabelStudioAuth:
    """Gives the headers that authenticate a request to one Label Studio instance, and the session to send them
    with: it follows redirects only on Label Studio's origin (:mod:`backend.labelstudio.redirects`)."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self.session = same_origin_session(self.base_url)
        self._timeout = timeout
        self._access: tuple[str, float] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LabelStudioAuth({self.base_url!r}, key={'set' if self._key else 'none'})"

    @property
    def has_key(self) -> bool:
        return bool(self._key)

    @property
    def api_key(self) -> str | None:
        return self._key

    def headers(self) -> dict[str, str]:
        if not self._key:
            return {}
        if not is_personal_access_token(self._key):
            return {"Authorization": f"Token {self._key}"}
        return {"Authorization": f"Bearer {self._access_token()}"}

    def _access_token(self) -> str:
        with self._lock:
            if self._access and self._access[1] > time.monotonic():
                return self._access[0]
            try:
                response = self.session.post(
                    f"{self.base_url}/api/token/refresh/", json={"refresh": self._key}, timeout=self._timeout
                )
            except RedirectRefused as exc:
                raise LabelStudioAuthError(str(exc)) from None
            except requests.RequestException as exc:
                raise LabelStudioAuthError(
                    f"could not reach Label Studio at {self.base_url} to refresh the access token "
                    f"({type(exc).__name__})"
                ) from None
            try:
                access = response.json()["access"] if response.status_code == 200 else None
            except (ValueError, KeyError, TypeError):
                access = None
            if not isinstance(access, str):
                raise KeyRefused(
                    f"Label Studio refused the personal access token (HTTP {response.status_code}); "
                    "set LABEL_STUDIO_API_KEY to a valid token from Account & Settings"
                )
            self._access = (access, time.monotonic() + ACCESS_TOKEN_REUSE_SECONDS)
            return self._access[0]
