"""Trained classifier versions on disk: ``MODEL_DIR/<project>/<version>/``, and a ``current`` pointer.

A run writes into ``.partial-<host>-<pid>-<version>/`` and is renamed to ``<version>/`` only
when complete; then ``current`` (a symlink) is replaced atomically. A failed or killed run
leaves the previous version current; the next run removes the partial directories of runs
that are gone (on this host: the process is dead; from another host sharing MODEL_DIR: older
than a job may run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from backend.jobs import JOB_TIMEOUT
from backend.training.classifier import Classifier

ABANDONED_AFTER_SECONDS = JOB_TIMEOUT + 600  # longer than any job may run


_PARTIAL = re.compile(r"^\.partial-(?P<host>.+)-(?P<pid>\d+)-v\d{8}-\d{6}-[0-9a-f]{6}$")


def _abandoned(partial: Path) -> bool:
    """Whether the run writing ``partial`` is gone: its process died (this host) or it is too old (any host)."""
    owner = _PARTIAL.match(partial.name)
    if owner is not None and owner["host"] == socket.gethostname():
        return not _alive(int(owner["pid"]))
    try:
        return time.time() - partial.stat().st_mtime > ABANDONED_AFTER_SECONDS
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class ClassifierVersions:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._loaded: dict[tuple[int, str, str], Classifier] = {}
        self._lock = threading.Lock()

    def project_dir(self, project: int) -> Path:
        return self.root / str(project)

    def begin(self, project: int) -> tuple[str, Path]:
        self.remove_abandoned(project)
        version = time.strftime("v%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:6]
        partial = self.project_dir(project) / f".partial-{socket.gethostname()}-{os.getpid()}-{version}"
        partial.mkdir(parents=True)
        return version, partial

    def remove_abandoned(self, project: int) -> list[Path]:
        """Remove the partial directories whose run can no longer finish; returns them."""
        directory = self.project_dir(project)
        if not directory.is_dir():
            return []
        removed = []
        for partial in directory.glob(".partial-*"):
            if _abandoned(partial):
                shutil.rmtree(partial, ignore_errors=True)
                removed.append(partial)
        return removed

    def commit(self, project: int, version: str, partial: Path) -> Path:
        final = self.project_dir(project) / version
        os.replace(partial, final)
        pointer = self.project_dir(project) / "current"
        staging = self.project_dir(project) / f".current-{uuid.uuid4().hex[:6]}"
        os.symlink(version, staging)
        os.replace(staging, pointer)  # atomic: readers see the old or the new version, never neither
        return final

    def discard(self, partial: Path) -> None:
        shutil.rmtree(partial, ignore_errors=True)

    def current(self, project: int) -> str | None:
        pointer = self.project_dir(project) / "current"
        return os.readlink(pointer) if pointer.is_symlink() else None

    def versions(self, project: int) -> list[dict[str, Any]]:
        directory = self.project_dir(project)
        if not directory.is_dir():
            return []
        current = self.current(project)
        found = []
        for path in sorted(directory.iterdir()):
            metrics = path / "metrics.json"
            if path.is_dir() and not path.is_symlink() and not path.name.startswith(".") and metrics.exists():
                found.append({"version": path.name, "current": path.name == current, **json.loads(metrics.read_text())})
        return found

    def projects(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name) for p in self.root.iterdir() if p.is_dir() and p.name.isdigit())

    def classifier(self, project: int, control: str) -> Classifier | None:
        """The current version's classifier for ``control``, loaded once per version."""
        version = self.current(project)
        if version is None:
            return None
        directory = self.project_dir(project) / version / control
        if not directory.is_dir():
            return None
        key = (project, version, control)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = Classifier.load(directory)
            return self._loaded[key]
