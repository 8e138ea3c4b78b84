"""A local Label Studio 1.23.2 and this backend side by side, for end-to-end tests and `make demo`.

Label Studio is a test peer, not a dependency: it lives in its own virtualenv (about 1 GB,
~70 s to install), cached in ``~/.cache/mllm-backend`` and reused by later runs. Both run on
loopback with SQLite and a temporary data directory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

LABEL_STUDIO_VERSION = "1.23.2"
DEFAULT_VENV = Path.home() / ".cache" / "mllm-backend" / f"label-studio-{LABEL_STUDIO_VERSION}"
ADMIN_EMAIL = "admin@example.com"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_venv(venv: Path, executable: str, pip_steps: list[list[str]], what: str,
                log: Callable[[str], None] = print) -> Path:  # fmt: skip
    """``venv/bin/<executable>``, creating the virtualenv and running each ``pip`` step (its arguments) in it the
    first time; a marker file says the install finished, so an interrupted one is redone."""
    path, marker = venv / "bin" / executable, venv / ".installed"
    if marker.exists() and path.exists():
        return path
    log(f"installing {what} into {venv} (first run only)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for step in pip_steps:
        subprocess.run([str(venv / "bin" / "pip"), "--disable-pip-version-check", *step], check=True, timeout=1800)
    marker.touch()
    return path


def ensure_label_studio(venv: Path = DEFAULT_VENV, log: Callable[[str], None] = print) -> Path:
    """The ``label-studio`` executable, installing it into its own virtualenv the first time (~70 s)."""
    spec = f"label-studio=={LABEL_STUDIO_VERSION}"
    return ensure_venv(venv, "label-studio", [["install", "--quiet", spec]], spec, log)


@dataclass
class ManagedProcess:
    """A child process with its output in a log file."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if ready():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} was not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


@dataclass
class Stack:
    """Label Studio and the backend, running."""

    workdir: Path
    label_studio_url: str
    backend_url: str
    token: str
    password: str
    files_root: Path
    processes: list[ManagedProcess] = field(default_factory=list)

    def logs(self) -> str:
        return "\n\n".join(f"===== {p.name} ({p.log_path}) =====\n{p.tail()}" for p in self.processes)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def start_stack(
    workdir: Path,
    model_dir: Path,
    backend_env: dict[str, str] | None = None,
    venv: Path = DEFAULT_VENV,
    ls_port: int | None = None,
    backend_port: int | None = None,
) -> Stack:
    """Start Label Studio (SQLite, loopback, legacy token on) and `mllm-backend serve` against it."""
    executable = ensure_label_studio(venv)
    workdir.mkdir(parents=True, exist_ok=True)
    files_root = workdir / "files"
    files_root.mkdir(exist_ok=True)
    token, password = secrets.token_hex(20), secrets.token_urlsafe(12)
    ls_port, backend_port = ls_port or free_port(), backend_port or free_port()
    ls_url, backend_url = f"http://127.0.0.1:{ls_port}", f"http://127.0.0.1:{backend_port}"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "VIRTUAL_ENV"))}
    ls_env = {
        **base_env,
        "LABEL_STUDIO_USERNAME": ADMIN_EMAIL,
        "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "SENTRY_DSN": "",  # offline: no error reports to a hosted service
        "FRONTEND_SENTRY_DSN": "",
        "PATH": f"{executable.parent}:{base_env.get('PATH', '')}",
    }
    label_studio = ManagedProcess(
        "label-studio",
        [str(executable), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(ls_port),
         "--host", ls_url, "--data-dir", str(workdir / "ls-data")],
        ls_env, workdir / "label-studio.log",
    ).start()  # fmt: skip
    backend = _backend_process("mllm-backend", backend_port, workdir / "backend.log", {
        **base_env, "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": token, "MODEL_DIR": str(model_dir),
        **(backend_env or {})})  # fmt: skip
    stack = Stack(workdir, ls_url, backend_url, token, password, files_root, [label_studio, backend])
    try:
        label_studio.wait_until(lambda: requests.get(f"{ls_url}/health", timeout=2).status_code == 200, 300)
        _wait_ready(backend, backend_url)
    except Exception:
        stack.stop()
        raise
    return stack


def _backend_process(name: str, port: int, log_path: Path, env: dict[str, str]) -> ManagedProcess:
    command = [sys.executable, "-m", "backend.cli", "serve", "--port", str(port)]
    return ManagedProcess(name, command, {**env, "HF_HUB_OFFLINE": "1"}, log_path).start()


def _wait_ready(backend: ManagedProcess, url: str) -> None:
    backend.wait_until(lambda: requests.get(f"{url}/health", timeout=2).json().get("model_state") == "ready", 180)


def start_backend(stack: Stack, name: str, env: dict[str, str]) -> str:
    """Another `mllm-backend serve` beside the stack's (same model and Label Studio, ``env`` on top), stopped with
    the stack; returns its URL."""
    [first] = [p for p in stack.processes if p.name == "mllm-backend"]
    port = free_port()
    backend = _backend_process(name, port, stack.workdir / f"{name}.log",
                               {**first.env, "MODEL_DIR": str(stack.workdir / f"{name}-model-dir"), **env})  # fmt: skip
    stack.processes.append(backend)
    _wait_ready(backend, f"http://127.0.0.1:{port}")
    return f"http://127.0.0.1:{port}"


def _headers(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Token {stack.token}"}


def upload_images(stack: Stack, project: int, paths: list[Path]) -> None:
    """Import image files as a user's "Import" click does: one task per file."""
    files = {path.name: (path.name, path.read_bytes(), "image/png") for path in paths}
    response = requests.post(
        f"{stack.label_studio_url}/api/projects/{project}/import", headers=_headers(stack), files=files, timeout=60
    )
    response.raise_for_status()


def add_local_files(client, stack: Stack, project: int, paths: list[Path], folder: str) -> None:
    """Serve ``paths`` from Label Studio's local-files storage and sync them into tasks."""
    target = stack.files_root / folder
    target.mkdir(parents=True, exist_ok=True)
    for path in paths:
        (target / path.name).write_bytes(path.read_bytes())
    before = len(list(client.tasks.list(project=project)))
    storage = client.import_storage.local.create(
        project=project, path=str(target), use_blob_urls=True, regex_filter=r".*\.(png|jpe?g)$", title=folder
    )
    # Label Studio swallows a failed sync (e.g. its SQLite busy under load) and skips one it thinks is queued:
    # ask again until the files are tasks, within a bound.
    for _ in range(10):
        client.import_storage.local.sync(id=storage.id)
        if len(list(client.tasks.list(project=project))) >= before + len(paths):
            return
        time.sleep(3)
    raise RuntimeError(f"Label Studio's local-files sync of {folder} made no tasks after 10 tries")


def connect_backend(client, stack: Stack, project: int, title: str = "MLLM annotator") -> int:
    """Settings → Model → Connect Model, with interactive preannotations on."""
    return int(client.ml.create(project=project, url=stack.backend_url, is_interactive=True, title=title).id)


def retrieve_predictions(client, project: int, task_ids: list[int] | None = None) -> None:
    """Data Manager → Actions → Retrieve predictions, for all tasks or a selection."""
    selected = {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": task_ids}
    client.actions.create(id="retrieve_tasks_predictions", project=project, selected_items=selected)


DEMO_SEED = 3000  # a shapes-world seed nothing was trained or tuned on
DEMO_TASKS = 24


def create_demo_project(client, stack: Stack, title: str = "MLLM annotator demo") -> int:
    """A shapes-world project with the world's own config: the boxes a person drew (geometry only: the labels are
    the model's to give), connected, predictions retrieved, a saved "Most suspicious first" tab, and every task
    opening on the model's labels."""
    from backend.shapes.world import write_world

    world = write_world(stack.workdir / "demo-world", tasks=DEMO_TASKS, seed=DEMO_SEED)
    config_path, tasks_path = world.projects["boxes_fine"]
    project = int(client.projects.create(title=title, label_config=config_path.read_text()).id)
    tasks = json.loads(tasks_path.read_text())
    for task in tasks:  # the person drew the boxes; the model names and labels them
        boxes = [r for r in task["annotations"][0]["result"] if r["type"] == "rectanglelabels"]
        task["annotations"] = [{"result": [{**r, "value": {**r["value"], "rectanglelabels": []}} for r in boxes]}]
    response = requests.post(f"{stack.label_studio_url}/api/projects/{project}/import", headers=_headers(stack),
                             json=tasks, timeout=120)  # fmt: skip
    response.raise_for_status()
    connect_backend(client, stack, project)  # the backend adds the "Most suspicious first" tab on connect
    retrieve_predictions(client, project)
    _open_on_predictions(client, stack, project)
    _wait_for_review_view(client, project)
    return project


def _wait_for_review_view(client, project: int, timeout: float = 60.0) -> None:
    """The tab the backend adds on connect (in the background); made here if it has not come (REVIEW_TAB=false)."""
    from backend.labelstudio.client import REVIEW_VIEW_TITLE, ensure_review_view

    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        if any(v.data.get("title") == REVIEW_VIEW_TITLE for v in client.views.list(project=project)):
            return
        time.sleep(1)
    ensure_review_view(client, project)


def _open_on_predictions(client, stack: Stack, project: int, timeout: float = 60.0) -> None:
    """Let each task open on the model's labels: Label Studio opens a task on its annotation when there is one,
    and pre-fills a new one from the prediction of the project's model_version when there is none. The person's
    unlabelled boxes live on in the prediction (same region ids and geometry), so they are deleted here once the
    backend has synced the project's model_version."""
    import time

    version = requests.get(f"{stack.backend_url}/versions", timeout=10).json()["model_version"]
    ends = time.monotonic() + timeout
    while client.projects.get(project).model_version != version:
        if time.monotonic() > ends:
            raise RuntimeError(f"project {project} never took the backend's model_version {version}")
        time.sleep(1)
    for task in client.tasks.list(project=project):
        for annotation in client.annotations.list(id=task.id):
            client.annotations.delete(id=annotation.id)


def run_demo(workdir: Path, port: int, backend_port: int) -> None:
    """`make demo`: Label Studio, the backend and a demo project, until Ctrl-C. Every run starts fresh."""
    import os
    import time

    from label_studio_sdk import LabelStudio

    from backend.devtools.devstack import ADMIN_EMAIL, create_demo_project, start_stack
    from backend.shapes.training import SHIPPED

    workdir = workdir.resolve()
    for stale in ("ls-data", "model-dir", "label-studio.log", "backend.log"):  # every demo starts fresh
        path = workdir / stale
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    model = os.environ.get("MLLM_MODEL")
    if not model:
        model = str(SHIPPED)
        print("MLLM_MODEL is not set: the demo serves the shapes model, trained here on synthetic shapes only.")
    print("Starting Label Studio and the backend (the first run installs Label Studio, ~1-2 min)...")
    stack = start_stack(workdir, workdir / "model-dir", {"MLLM_MODEL": model}, ls_port=port, backend_port=backend_port)
    try:
        client = LabelStudio(base_url=stack.label_studio_url, api_key=stack.token, timeout=120)
        project = create_demo_project(client, stack)
        print(f"""
Label Studio: {stack.label_studio_url}/projects/{project}/data   (sort by "Prediction score" ascending)
  login:      {ADMIN_EMAIL} / {stack.password}
  API token:  {stack.token}
Backend:      {stack.backend_url}   (model: {model})
Logs:         {workdir}/label-studio.log, {workdir}/backend.log

The shapes model knows only the shapes world. For real images, restart with a real model:
  MLLM_MODEL=Qwen/Qwen2.5-VL-7B-Instruct make demo          (on a GPU)
  MLLM_PROVIDER=openai OPENAI_BASE_URL=http://localhost:8000/v1 MLLM_MODEL=<served model> make demo
Press Ctrl-C to stop.""")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
