"""No credential follows a redirect off Label Studio's origin, on any client path.

A loopback Label Studio stand-in answers 301, 302, 303, 307 or 308 to a canary: another host
(127.0.0.2), the same host on another port, a scheme-relative ``//host``, a ``Location`` whose
userinfo spells Label Studio's address, and (from an https stand-in with a test CA's
certificate) plain http on Label Studio's own host and port. Each client path the backend has is
driven with each credential it carries: the legacy token, the personal access token (and the
access token it is exchanged for), the basic-auth pair and the webhook secret. The canary must
receive nothing at all (the hop is refused before it is sent), and the error must say where
Label Studio redirected to. Same-origin redirects (a trailing slash) must still be followed.
"""

from __future__ import annotations

import ast
import base64
import json
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from backend.labelstudio.auth import LabelStudioAuth, LabelStudioAuthError
from backend.labelstudio.client import LabelStudioSites, ModelVersionSync, connect, prediction_scores
from backend.labelstudio.connection import KeyCheck, ProjectSetup
from backend.labelstudio.redirects import RedirectRefused, SameOrigin, origin
from backend.settings import Settings
from tests.loopback import LoopbackServer, Reply, Seen

STATUSES = (301, 302, 303, 307, 308)
PROJECT = 3
BACKEND_URL = "http://backend.example:9090/"


def _jwt(token_type: str) -> str:
    def part(payload: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")

    claims = {"token_type": token_type, "exp": int(time.time()) + 3600, "jti": f"{token_type}-canary-jti"}
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl{token_type}"


LEGACY = "legacy0secret0token0000000000000000000000"
PAT = _jwt("refresh")
ACCESS = _jwt("access")
BASIC_USER, BASIC_PASS = "reviewer", "basic-auth-secret-pw"
WEBHOOK_SECRET = "webhook-secret-0123"
SECRETS = (LEGACY, PAT, ACCESS, BASIC_PASS, base64.b64encode(f"{BASIC_USER}:{BASIC_PASS}".encode()).decode(),
           WEBHOOK_SECRET)  # fmt: skip


def _tempting(_: Seen) -> Reply:
    """What a canary answers: enough to keep any client going, so a leak would show as a second request."""
    return Reply.json({"access": ACCESS, "id": 1, "model_version": "v", "label_config": "<View/>", "results": []})


@pytest.fixture(scope="module")
def canaries() -> Iterator[dict[str, LoopbackServer]]:
    with (
        LoopbackServer(fallback=_tempting, host="127.0.0.2") as other_host,
        LoopbackServer(fallback=_tempting) as other_port,
    ):
        yield {"host": other_host, "port": other_port}


def _targets(canaries: dict[str, LoopbackServer]) -> dict[str, Callable[[LoopbackServer, str], str]]:
    host, port = canaries["host"], canaries["port"]
    return {
        "another host": lambda ls, path: f"{host.url}{path}",
        "same host, another port": lambda ls, path: f"{port.url}{path}",
        "scheme-relative //host": lambda ls, path: f"//127.0.0.2:{host.port}{path}",
        "userinfo spelling Label Studio": lambda ls, path: f"http://127.0.0.1:{ls.port}@127.0.0.2:{host.port}{path}",
    }


def _leaks(servers: list[LoopbackServer], plain_only: bool = False) -> list[str]:
    """Every request a canary received (a canary should receive none), secret or not."""
    return [f"{s.url}: {seen.method} {seen.path}" for s in servers for seen in s.seen if not plain_only or not seen.tls]


def _secrets_in(servers: list[LoopbackServer]) -> list[str]:
    found = []
    for server in servers:
        for seen in server.seen:
            text = json.dumps(seen.headers) + seen.body.decode("latin-1")
            found += [secret[:8] for secret in SECRETS if secret in text]
    return found


class StandIn:
    """A Label Studio that answers ``redirected`` paths ("METHOD /path") with a redirect and the rest properly."""

    def __init__(self, status: int, target: Callable[[LoopbackServer, str], str], redirected: set[str],
                 tls: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self.status, self.target, self.redirected = status, target, redirected
        self.server = LoopbackServer(fallback=self._answer, tls=tls)

    def _answer(self, request: Seen) -> Reply:
        path = request.path.split("?")[0]
        if f"{request.method} {path}" in self.redirected or "*" in self.redirected:
            return Reply(self.status, b"", {"Location": self.target(self.server, request.path)})
        return _label_studio(request, path)


def _label_studio(request: Seen, path: str) -> Reply:
    """The few answers of a real Label Studio 1.23 the client paths need on their way to the redirected call."""
    if path == "/api/token/refresh/":
        return Reply.json({"access": ACCESS})
    if path == "/api/current-user/whoami":
        return Reply.json({"id": 1, "email": "a@example.com"})
    if path == f"/api/projects/{PROJECT}/":
        return Reply.json({"id": PROJECT, "model_version": "old", "label_config": "<View/>"})
    if path == "/api/dm/views/":
        return Reply.json([])
    if path == "/api/webhooks/":
        return Reply.json([{"id": 7, "project": PROJECT, "url": BACKEND_URL + "webhook", "headers": {}}])
    return Reply(404, b'{"detail": "Not found."}', {"Content-Type": "application/json"})


def _settings(tmp_path: Path, url: str, key: str, **env: str) -> Settings:
    return Settings.from_env({"MLLM_MODEL": "m", "MODEL_DIR": str(tmp_path), "LABEL_STUDIO_URL": url,
                              "LABEL_STUDIO_API_KEY": key, **env})  # fmt: skip


# Each client path: (what Label Studio redirects, the key it carries, a call that returns the error it reports).
def _refresh(url: str, key: str, tmp_path: Path) -> str:
    with pytest.raises(LabelStudioAuthError) as caught:
        LabelStudioAuth(url, key).headers()
    return str(caught.value)


def _key_check(url: str, key: str, tmp_path: Path) -> str:
    problem, refused = KeyCheck(LabelStudioAuth(url, key)).check()
    assert not refused, "another host's answer is not Label Studio refusing the key"
    return problem or ""


def _version_sync(url: str, key: str, tmp_path: Path) -> str:
    sync = ModelVersionSync(LabelStudioSites(url, key))
    thread = sync.request(f"{PROJECT}.1", "ours", patience=0.5)
    assert thread is not None
    thread.join(timeout=20)
    return " ".join(sync.problems)


def _project_setup(url: str, key: str, tmp_path: Path, **env: str) -> str:
    settings = _settings(tmp_path, url, key, **env)
    setup = ProjectSetup(settings, LabelStudioSites(url, key))
    thread = setup.request(f"{PROJECT}.1", BACKEND_URL)
    assert thread is not None
    thread.join(timeout=20)
    return " ".join(setup.problems)


def _review_tab(url: str, key: str, tmp_path: Path) -> str:
    return _project_setup(url, key, tmp_path, REVIEW_TAB="true")


def _webhook_credentials(url: str, key: str, tmp_path: Path) -> str:
    return _project_setup(url, key, tmp_path, REVIEW_TAB="false", BASIC_AUTH_USER=BASIC_USER,
                          BASIC_AUTH_PASS=BASIC_PASS, WEBHOOK_SECRET=WEBHOOK_SECRET)  # fmt: skip


def _training_export(url: str, key: str, tmp_path: Path) -> str:
    from backend.training.run import train_project

    with pytest.raises(RuntimeError) as caught:
        train_project(_settings(tmp_path, url, key), PROJECT)
    return str(caught.value)


def _posting(url: str, key: str, tmp_path: Path) -> str:
    from backend.preannotate import label_studio_client

    client = label_studio_client(_settings(tmp_path, url, key))
    with pytest.raises(RedirectRefused) as caught:
        client.predictions.create(task=1, model_version="ours", score=0.5, result=[])
    return str(caught.value)


def _review_plan(url: str, key: str, tmp_path: Path) -> str:
    with pytest.raises(RedirectRefused) as caught:
        prediction_scores(connect(url, key), PROJECT, "ours")
    return str(caught.value)


def _image_fetch(url: str, key: str, tmp_path: Path) -> str:
    from backend.labelstudio.media import ImageLoader, MediaError, MediaLimits

    loader = ImageLoader(MediaLimits(max_bytes=10_000, max_pixels=10_000, timeout=5.0))
    with pytest.raises(MediaError) as caught:
        loader.fetch("/data/upload/1/a.png", LabelStudioAuth(url, key))
    return str(caught.value)


PATHS = {  # name: (call, Label Studio's redirected requests, keys)
    "token refresh": (_refresh, {"POST /api/token/refresh/"}, (PAT,)),
    "token refresh for an image": (_image_fetch, {"POST /api/token/refresh/"}, (PAT,)),
    "key check": (_key_check, {"GET /api/current-user/whoami"}, (LEGACY, PAT)),
    "key check's refresh": (_key_check, {"POST /api/token/refresh/"}, (PAT,)),
    "model_version sync": (_version_sync, {f"GET /api/projects/{PROJECT}/"}, (LEGACY, PAT)),
    "SDK's own token refresh": (_version_sync, {"POST /api/token/refresh/"}, (PAT,)),
    "review tab": (_review_tab, {"GET /api/dm/views/"}, (LEGACY, PAT)),
    "webhook credentials": (_webhook_credentials, {"PATCH /api/webhooks/7/"}, (LEGACY, PAT)),
    "training export": (_training_export, {f"GET /api/projects/{PROJECT}/"}, (LEGACY, PAT)),
    "pre-annotation posting": (_posting, {"POST /api/predictions/"}, (LEGACY, PAT)),
    "review plan and evaluation report": (_review_plan, {"GET /api/tasks/"}, (LEGACY, PAT)),
}
CASES = [(name, key) for name, (_, _, keys) in PATHS.items() for key in keys]


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize(("path", "key"), CASES, ids=[f"{n}-{'pat' if k == PAT else 'legacy'}" for n, k in CASES])
def test_no_client_path_follows_a_redirect_off_label_studio(canaries, tmp_path, path, key, status):
    call, redirected, _ = PATHS[path]
    for canary in canaries.values():
        canary.seen.clear()  # each case is judged on its own requests
    for name, target in _targets(canaries).items():
        stand_in = StandIn(status, target, redirected)
        with stand_in.server as ls:
            error = call(ls.url, key, tmp_path)
        assert not _leaks(list(canaries.values())), (name, _secrets_in(list(canaries.values())))
        assert f"Label Studio at {ls.url} redirects to http://127.0.0.2:" in error or (
            name == "same host, another port" and f"redirects to {canaries['port'].url}" in error
        ), (name, error)
        assert "set LABEL_STUDIO_URL to http://127.0.0." in error, error
        assert not any(secret in error for secret in SECRETS), error
        assert any(seen.path.split("?")[0] == p.split(" ")[1] for seen in ls.seen for p in redirected), (name, ls.seen)


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Iterator[ssl.SSLContext]:
    """A server context with a test CA's certificate for 127.0.0.1; both HTTP clients trust that CA."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    bundle = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REQUESTS_CA_BUNDLE", str(bundle))  # requests
        patch.setenv("SSL_CERT_FILE", str(bundle))  # httpx
        yield context


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize(("path", "key"), CASES, ids=[f"{n}-{'pat' if k == PAT else 'legacy'}" for n, k in CASES])
def test_an_https_label_studio_redirecting_to_http_on_its_own_port_is_refused(tls, tmp_path, path, key, status):
    """Same host, same port, only the scheme differs: the stand-in's plain-http side must see nothing."""
    call, redirected, _ = PATHS[path]
    stand_in = StandIn(status, lambda ls, p: f"{ls.http_url}{p}", redirected, tls=tls)
    with stand_in.server as ls:
        error = call(ls.url, key, tmp_path)
    assert [s for s in ls.seen if s.tls], "the https side answered the first request"
    assert not _leaks([ls], plain_only=True), _secrets_in([ls])
    assert f"Label Studio at {ls.url} redirects to {ls.http_url}/" in error, error
    assert f"set LABEL_STUDIO_URL to {ls.http_url} if" in error, error


def test_same_origin_redirects_are_followed_with_the_credential(tmp_path):
    """Label Studio's own redirects (a missing trailing slash) still work, and the key still goes with them."""
    seen_keys = []

    def project(request: Seen) -> Reply:
        seen_keys.append(request.headers.get("Authorization"))
        return Reply.json({"id": PROJECT, "model_version": "old", "label_config": "<View/>"})

    routes = {f"GET /api/projects/{PROJECT}/": project, "POST /api/token/refresh/": lambda _: Reply.json({"access":
              ACCESS}), "GET /api/current-user/whoami/": lambda r: Reply.json({"id": 1})}  # fmt: skip
    slash = lambda request: Reply(308, b"", {"Location": request.path.split("?")[0] + "/"})  # noqa: E731
    with LoopbackServer(routes, fallback=slash) as ls:
        client = connect(ls.url, LEGACY)
        client._client_wrapper.httpx_client.request(f"api/projects/{PROJECT}", method="GET")
        assert seen_keys == [f"Token {LEGACY}"]
        auth = LabelStudioAuth(ls.url, PAT)
        assert auth.headers() == {"Authorization": f"Bearer {ACCESS}"}
        assert KeyCheck(auth).check() == (None, False)  # whoami → whoami/ on the same origin
        assert [s.path for s in ls.seen][-2:] == ["/api/current-user/whoami", "/api/current-user/whoami/"]


def test_the_server_stays_up_and_says_why_in_health_and_in_the_task(make_client, canaries):
    """The deployed server: every call to Label Studio redirects away. /predict still answers, the task's error
    names the redirect, /health lists it, and no canary sees a request."""
    for canary in canaries.values():
        canary.seen.clear()
    stand_in = StandIn(307, _targets(canaries)["another host"], {"*"})
    with stand_in.server as ls:
        client, service = make_client(LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=PAT, REVIEW_TAB="true")
        config = ('<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="a"/>'
                  '<Choice value="b"/></Choices></View>')  # fmt: skip
        assert client.post("/setup", json={"project": f"{PROJECT}.1", "schema": config}).status_code == 200
        [result] = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}],
                                                 "label_config": config}).get_json()["results"]  # fmt: skip
        assert "redirects to http://127.0.0.2:" in result["error"], result
        ends = time.monotonic() + 15
        while time.monotonic() < ends and not any("redirects to" in w for w in _warnings(client)):
            time.sleep(0.2)
        warnings = _warnings(client)
        assert any(f"Label Studio at {ls.url} redirects to http://127.0.0.2:" in w for w in warnings), warnings
        assert len(warnings) == len(set(warnings))
    assert not _leaks(list(canaries.values()))


def _warnings(client) -> list[str]:
    response = client.get("/health")
    assert response.status_code == 200
    return response.get_json()["warnings"]


@pytest.mark.parametrize(("url", "expected"), [
    ("http://LS.example:8080/x", ("http", "ls.example", 8080)),
    ("https://ls.example", ("https", "ls.example", 443)),
    ("http://[::1]/", ("http", "::1", 80)),
    ("http://a@ls.example/", None),
    ("http://ls.example:99999/", None),
    ("http://ls.example\\@b/", None),
    ("ftp://ls.example/", None),
    ("http://ls.example\r\n/", None),
])  # fmt: skip
def test_origin_reads_the_host_requests_connects_to_and_refuses_the_rest(url, expected):
    assert origin(url) == expected


def test_a_refusal_names_the_base_to_configure_with_its_path_prefix_and_hides_query_and_credentials():
    guard = SameOrigin("http://ls.internal:8080/label-studio")
    with pytest.raises(RedirectRefused) as caught:
        guard.check("https://user:pw@ls.example.com/label-studio/api/projects/?token=abc")
    message = str(caught.value)
    assert "redirects to https://ls.example.com/label-studio/api/projects/?…" in message
    assert "set LABEL_STUDIO_URL to https://ls.example.com/label-studio if" in message
    assert "pw" not in message and "abc" not in message
    guard.check("http://LS.internal:8080/label-studio/api/")  # its own origin passes


def test_every_sdk_client_is_built_by_connect():
    """The SDK's clients all come from ``connect``, whose httpx client carries the rule: no path builds its own."""
    root = Path(__file__).resolve().parents[1] / "backend"
    builders = []
    for file in root.rglob("*.py"):
        if "devtools" in file.parts:  # the dev stack's own set-up of a local Label Studio, not the backend's
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in {
                "LabelStudio", "AsyncLabelStudio"}:  # fmt: skip
                builders.append(f"{file.relative_to(root)}:{node.lineno}")
    assert builders == ["labelstudio/client.py:" + str(_connect_line(root))], builders


def _connect_line(root: Path) -> int:
    tree = ast.parse((root / "labelstudio" / "client.py").read_text())
    [function] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "connect"]
    [call] = [n for n in ast.walk(function) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "LabelStudio"]
    return call.lineno
