"""Safe on a real network (issue 8): outbound fetch policy, deadlines, credentials, limits, bad-input reasons.

Everything runs on 127.0.0.1, so the tests allow exactly the image hosts they need (LABEL_STUDIO_URL's origin,
IMAGE_URL_ALLOW host:port) and show that another loopback server, standing for an internal service, receives
nothing whatever spelling or redirect a task uses.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from backend.errors import reason_of
from backend.images import ImageError, ImageFetcher, decode_image
from backend.inference import InferenceThreads
from backend.ls_config import LabelConfigError, parse_label_config
from backend.server import create_app
from backend.settings import Settings
from testing.http_servers import LocalServer, drip, redirect, reply
from testing.label_studio import (connect_ml_backend, create_project, import_uploads, predictions_of,
                                  retrieve_predictions)
from testing.redis_server import RedisServer

USER, PASSWORD = "labelstudio", "s3cret-backend"
WEB_USER, WEB_PASSWORD = "demo", "s3cret-demo"
LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"
CONFIG = """<View><Image name="image" value="$image"/>
<PolygonLabels name="parts" toName="image"><Label value="Face"/><Label value="Hair"/></PolygonLabels></View>"""


def png(width: int = 40, height: int = 30, mode: str = "RGB", color=(200, 30, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


PNG = png()


def jwt(payload: dict) -> str:
    enc = lambda obj: base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{enc({'alg': 'HS256', 'typ': 'JWT'})}.{enc(payload)}.c2ln"


def reason(fn) -> str:
    try:
        fn()
    except ImageError as exc:
        return reason_of(exc)
    return "ok"


@pytest.fixture(scope="module")
def internal():
    """An internal service: answers anything with 200, and must never be asked."""
    with LocalServer() as server:
        server.route("/", reply(PNG))
        server.route("/secret.png", reply(PNG))
        yield server


@pytest.fixture(scope="module")
def image_host(internal):
    """An allowed image host with redirect chains, some of which lead to the internal service."""
    with LocalServer({"/ok.png": reply(PNG)}) as host:
        host.route("/to-ok", redirect(f"{host.url}/ok.png"))
        host.route("/to-internal", redirect(f"{internal.url}/secret.png"))
        host.route("/to-internal-decimal", redirect(f"http://2130706433:{internal.port}/secret.png", 307))
        host.route("/chain-1", redirect("/chain-2", 301))
        host.route("/chain-2", redirect(f"http://localhost:{internal.port}/secret.png", 308))
        host.route("/loop", redirect("/loop"))
        host.route("/drip", drip(0.2))
        host.route("/drip-chunked", drip(0.2, chunked=True))
        yield host


@pytest.fixture(scope="module")
def other_host():
    """Another (allowed) host: Label Studio's credentials must never reach it."""
    with LocalServer({"/a.png": reply(PNG), "/api/token/refresh/": reply(b'{"access": "x"}', 200,
                                                                          "application/json")}) as host:
        yield host


@pytest.fixture(scope="module")
def fake_ls(other_host):
    """Label Studio's origin as far as image URLs go: an upload, and a redirect to another host."""
    with LocalServer({"/data/upload/1/a.png": reply(PNG)}) as ls:
        ls.route("/data/upload/1/moved.png", redirect(f"{other_host.url}/a.png"))
        ls.route("/api/token/refresh/", redirect(f"{other_host.url}/api/token/refresh/", 307))
        yield ls


def fetcher(ls_url: str = "", allow: str = "", **kw) -> ImageFetcher:
    return ImageFetcher(Settings(label_studio_url=ls_url, label_studio_api_key=kw.pop("key", LEGACY_KEY),
                                 image_url_allow=allow, **kw))


# ----------------------------------------------------------------------------- outbound fetch policy

def internal_spellings(port: int) -> list[str]:
    return [f"http://127.0.0.1:{port}/secret.png", f"http://localhost:{port}/secret.png",
            f"http://2130706433:{port}/secret.png", f"http://0x7f000001:{port}/secret.png",
            f"http://127.1:{port}/secret.png", f"http://0177.0.0.1:{port}/secret.png",
            f"http://0.0.0.0:{port}/secret.png", f"http://[::1]:{port}/secret.png",
            f"http://[::ffff:127.0.0.1]:{port}/secret.png", f"http://[::ffff:7f00:1]:{port}/secret.png",
            f"http://LOCALHOST.:{port}/secret.png"]


def test_internal_addresses_are_blocked_in_every_spelling_and_after_redirects(internal, image_host, fake_ls):
    f = fetcher(fake_ls.url, f"127.0.0.1:{image_host.port}")
    redirects = [f"{image_host.url}/{p}" for p in ("to-internal", "to-internal-decimal", "chain-1")]
    reasons = {url: reason(lambda url=url: f.fetch(url)) for url in internal_spellings(internal.port) + redirects}
    assert set(reasons.values()) == {"blocked"}, reasons
    assert internal.hits == []
    # The allowed hosts still work, redirects included; a redirect loop ends.
    assert f.fetch(f"{image_host.url}/to-ok") == PNG
    assert f.fetch("/data/upload/1/a.png") == PNG
    assert reason(lambda: f.fetch(f"{image_host.url}/loop")) == "fetch"


def test_without_allow_list_only_label_studio_origin_is_reachable(internal, fake_ls):
    f = fetcher(fake_ls.url)
    assert f.fetch(f"{fake_ls.url}/data/upload/1/a.png") == PNG
    # Same host, another port: not Label Studio's origin.
    assert reason(lambda: f.fetch(f"http://127.0.0.1:{internal.port}/secret.png")) == "blocked"
    assert internal.hits == []


def test_cidr_allow_list_admits_a_network(internal):
    before = len(internal.hits)
    assert fetcher("", "127.0.0.0/8").fetch(f"http://127.1:{internal.port}/secret.png") == PNG
    assert len(internal.hits) == before + 1
    internal.hits.clear()


def test_allowed_host_name_keeps_its_host_header_on_the_pinned_connection(image_host):
    # The connection goes to the address that was checked; the request still names the host it asked for.
    f = fetcher("", f"localhost:{image_host.port}")
    assert f.fetch(f"http://localhost:{image_host.port}/ok.png") == PNG
    assert image_host.hits[-1].headers["Host"] == f"localhost:{image_host.port}"


def test_token_goes_to_label_studio_only(fake_ls, other_host):
    f = fetcher(fake_ls.url, f"127.0.0.1:{other_host.port}")
    assert f.fetch("/data/upload/1/moved.png") == PNG          # LS answers with a redirect to another host
    assert fake_ls.hits[-1].headers.get("Authorization") == f"Token {LEGACY_KEY}"
    assert other_host.hits and all("Authorization" not in h.headers for h in other_host.hits)


def test_token_is_never_downgraded_from_https_to_http(fake_ls):
    https_ls = fake_ls.url.replace("http://", "https://")
    f = fetcher(https_ls, f"127.0.0.1:{fake_ls.port}")
    assert f.fetch(f"{fake_ls.url}/data/upload/1/a.png") == PNG
    assert "Authorization" not in fake_ls.hits[-1].headers


def test_personal_access_token_refresh_follows_no_redirect(fake_ls, other_host):
    pat = jwt({"token_type": "refresh", "exp": int(time.time()) + 3600})
    f = fetcher(fake_ls.url, f"127.0.0.1:{other_host.port}", key=pat)
    seen = len(other_host.hits)
    assert reason(lambda: f.fetch("/data/upload/1/a.png")) == "fetch"
    assert len(other_host.hits) == seen                          # the refresh token stayed home
    assert fake_ls.hits[-1].path == "/api/token/refresh/"


@pytest.mark.parametrize("path", ["/drip", "/drip-chunked"])
def test_slow_drip_is_cut_at_the_deadline(image_host, path):
    # 1 byte every 0.2 s never trips the 1 s read timeout; only the whole-download deadline (1.5 s) stops it.
    f = fetcher("", f"127.0.0.1:{image_host.port}", image_connect_timeout=0.5, image_read_timeout=1.0)
    with pytest.raises(ImageError, match="timed out"):
        f.fetch(image_host.url + path)
    # Cut after a handful of bytes: without the deadline the host would go on for 10,000 of them.
    assert image_host.sent[path] < 40


def test_failure_messages_carry_no_response_bytes(image_host):
    def leaky(h):
        h.send_response(500, "SECRET-REASON")
        h.send_header("Content-Length", "11")
        h.end_headers()
        h.wfile.write(b"SECRET-BODY")
    image_host.route("/leaky", leaky)
    with pytest.raises(ImageError) as info:
        fetcher("", f"127.0.0.1:{image_host.port}").fetch(image_host.url + "/leaky")
    assert "SECRET" not in str(info.value) and "500" in str(info.value)


def test_bad_urls_get_bad_url(tmp_path):
    f = fetcher("http://ls.invalid:8080", local_files_root=str(tmp_path))
    long_url = "http://example.com/" + "a" * 9000
    with pytest.raises(ImageError) as info:
        f.fetch(long_url)
    assert reason_of(info.value) == "bad_url" and len(str(info.value)) < 400
    assert reason(lambda: f.fetch("http://" + "a" * 300 + "/x.png")) == "bad_url"
    assert reason(lambda: f.fetch("http://" + ".".join(["a" * 63] * 5) + "/x.png")) == "bad_url"
    assert reason(lambda: f.fetch("/data/local-files/?d=photos/a%00.png")) == "bad_url"
    assert reason(lambda: f.fetch("http://[::1/x.png")) == "bad_url"
    assert reason(lambda: f.fetch("gopher://127.0.0.1:70/x")) == "bad_url"


# ----------------------------------------------------------------------------- decoding and config values

def test_one_pixel_strips_and_wide_tiffs_decode():
    assert decode_image(png(3000, 1), 10**7).size == (3000, 1)
    assert decode_image(png(1, 3000), 10**7).size == (1, 3000)
    for mode, values in (("I", np.array([[0, 30000], [65535, 1000]], dtype=np.int32)),
                         ("F", np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32))):
        buf = io.BytesIO()
        Image.fromarray(values, mode).save(buf, format="TIFF")
        grey = np.asarray(decode_image(buf.getvalue(), 10**7))[:, :, 0]
        assert grey.min() == 0 and grey.max() == 255 and 0 < grey[0, 1] < 255, (mode, grey)   # not all white
    buf = io.BytesIO()
    Image.fromarray(np.array([[-5.0, 1.0]], dtype=np.float32), "F").save(buf, format="TIFF")
    assert reason(lambda: decode_image(buf.getvalue(), 10**7)) == "decode"


@pytest.mark.parametrize("attr", ['model_score_threshold="nan"', 'model_score_threshold="1.5"',
                                  'model_polygon_detail="1e308"', 'model_polygon_detail="inf"',
                                  'model_min_pixels="1e400"'])
def test_control_numbers_must_be_finite_and_in_range(attr):
    config = CONFIG.replace('toName="image">', f'toName="image" {attr}>')
    with pytest.raises(LabelConfigError) as info:
        parse_label_config(config, Settings())
    assert info.value.reason == "bad_config"


# ----------------------------------------------------------------------------- one inference at a time

def test_inferences_run_one_at_a_time_on_one_dedicated_thread():
    runner = InferenceThreads(1)
    active, peak, names, lock = [0], [0], set(), threading.Lock()

    def work() -> str:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        with lock:
            active[0] -= 1
        return threading.current_thread().name

    callers = [threading.Thread(target=lambda: names.add(runner.run(work))) for _ in range(8)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=30)
    assert peak[0] == 1 and len(names) == 1 and next(iter(names)).startswith("m2fp-inference")
    with pytest.raises(ZeroDivisionError):
        runner.run(lambda: 1 / 0)


def test_upsampling_one_query_at_a_time_gives_the_same_masks():
    # Large images are upsampled one query at a time (bounded memory): the masks and scores must not change.
    import torch

    from backend.engine.postprocess import _masks_and_scores

    logits = torch.randn(6, 24, 32, generator=torch.Generator().manual_seed(3))
    args = (list(range(6)), (96, 128), (90, 120), (301, 403))
    four, one = _masks_and_scores(logits, *args, chunk=4), _masks_and_scores(logits, *args, chunk=1)
    assert four.keys() == one.keys()
    for q in four:
        assert np.array_equal(four[q][0], one[q][0]) and four[q][1] == pytest.approx(one[q][1], rel=1e-6)


# ----------------------------------------------------------------------------- Redis with a password

def test_password_protected_redis_takes_the_url_with_its_password(tmp_path):
    import redis

    from backend.batch import worker as worker_cli
    from backend.batch.cli import _redacted

    server = RedisServer(tmp_path, password="0123abcd" * 4)
    server.start()
    try:
        assert worker_cli.redis_connection(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            worker_cli.redis_connection(server.url.replace(f":{server.password}@", "")).ping()
        assert server.password not in _redacted(server.url)
    finally:
        server.stop()


# ----------------------------------------------------------------------------- the app without a model

def test_web_ui_off_and_separate_web_credentials():
    settings = Settings(model="/nonexistent", basic_auth_user=USER, basic_auth_pass=PASSWORD, web_ui=False)
    client = create_app(settings=settings, preload=False).test_client()
    auth = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    assert client.get("/demo", headers=auth).status_code == 404
    assert client.post("/api/parse", headers=auth, data=PNG).status_code == 404
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Basic !!!"}).status_code == 401


# ----------------------------------------------------------------------------- the real served backend

def basic(user: str, password: str) -> tuple[str, str]:
    return (user, password)


@pytest.fixture(scope="module")
def backend(backend_server, model_dir, label_studio, image_host, tmp_path_factory):
    local_root = tmp_path_factory.mktemp("local-files")
    return backend_server(env={
        "M2FP_MODEL": str(model_dir), "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token, "IMAGE_URL_ALLOW": f"127.0.0.1:{image_host.port}",
        "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD, "WEB_AUTH_USER": WEB_USER,
        "WEB_AUTH_PASS": WEB_PASSWORD, "MAX_UPLOAD_BYTES": "300000", "MAX_TASKS_PER_REQUEST": "50",
        "LOCAL_FILES_DOCUMENT_ROOT": str(local_root)})


def predict(backend, tasks: list[dict], config: str = CONFIG, **kw) -> requests.Response:
    return requests.post(backend.url + "/predict", auth=basic(USER, PASSWORD), timeout=300, json={
        "tasks": tasks, "label_config": config, "project": "1.1", "params": {"context": None}}, **kw)


def test_every_route_but_health_needs_credentials(backend):
    routes = [("GET", "/"), ("POST", "/predict"), ("POST", "/setup"), ("POST", "/webhook"), ("GET", "/versions"),
              ("POST", "/train"), ("GET", "/metrics"), ("GET", "/demo"), ("GET", "/api/info"), ("POST", "/api/parse")]
    for method, path in routes:
        for auth in (None, basic(USER, "wrong"), basic("", "")):
            answer = requests.request(method, backend.url + path, auth=auth, json={}, timeout=30)
            assert answer.status_code == 401, (method, path, auth)
            assert answer.json()["error"] == "unauthorized" and "Basic" in answer.headers["WWW-Authenticate"]
    assert requests.get(backend.url + "/health", timeout=30).status_code == 200
    assert requests.get(backend.url + "/metrics", auth=basic(USER, PASSWORD), timeout=30).status_code == 200
    # The demo page has its own credentials: Label Studio's do not open it, and the demo's do not open /predict.
    assert requests.get(backend.url + "/api/info", auth=basic(USER, PASSWORD), timeout=30).status_code == 401
    assert requests.get(backend.url + "/api/info", auth=basic(WEB_USER, WEB_PASSWORD), timeout=30).status_code == 200
    assert requests.get(backend.url + "/metrics", auth=basic(WEB_USER, WEB_PASSWORD), timeout=30).status_code == 401


def test_real_label_studio_connects_with_basic_auth(backend, label_studio, sample_images):
    ls = label_studio
    project = create_project(ls, CONFIG)
    ids = import_uploads(ls, project, sample_images[:1])
    with pytest.raises(RuntimeError):   # LS calls /setup with the wrong password: refused, not connected
        connect_ml_backend(ls, project, backend.url, basic_auth=(USER, "wrong"))
    connect_ml_backend(ls, project, backend.url, basic_auth=(USER, PASSWORD))
    retrieve_predictions(ls, project, ids)
    stored = predictions_of(ls, ids[0])
    assert len(stored) == 1 and stored[0]["result"], stored


def test_predict_tasks_pointing_inside_are_blocked_end_to_end(backend, internal, image_host):
    tasks = [{"id": i, "data": {"image": url}} for i, url in enumerate(
        internal_spellings(internal.port) + [f"{image_host.url}/to-internal", f"{image_host.url}/chain-1"])]
    answer = predict(backend, tasks + [{"id": 99, "data": {"image": f"{image_host.url}/ok.png"}}])
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert all(r == [] for r in results[:-1]) and results[-1] != []
    stats = requests.get(backend.url + "/metrics", auth=basic(USER, PASSWORD), timeout=30).json()
    assert stats["failures"].get("blocked") == len(tasks) and "internal" not in stats["failures"]
    assert internal.hits == []


def test_bad_task_inputs_get_specific_reasons(backend):
    long_host = "http://" + "a" * 300 + ".example/x.png"
    tasks = [{"id": 1, "data": {"image": long_host}},
             {"id": 2, "data": {"image": "/data/local-files/?d=a%00b.png"}},
             {"id": 3, "data": {"image": "http://example.com/" + "x" * 20000}}]
    before = requests.get(backend.url + "/metrics", auth=basic(USER, PASSWORD), timeout=30).json()["failures"]
    assert predict(backend, tasks).json()["results"] == [[], [], []]
    stats = requests.get(backend.url + "/metrics", auth=basic(USER, PASSWORD), timeout=30)
    failures = stats.json()["failures"]
    assert failures.get("bad_url", 0) - before.get("bad_url", 0) == 3 and "internal" not in failures
    assert len(stats.content) < 20000    # the 20 KB URL is not echoed whole
    for attr in ('model_score_threshold="nan"', 'model_polygon_detail="1e308"'):
        config = CONFIG.replace('toName="image">', f'toName="image" {attr}>')
        answer = requests.post(backend.url + "/setup", auth=basic(USER, PASSWORD), timeout=60,
                               json={"project": "1.1", "schema": config})
        assert answer.status_code == 400 and answer.json()["error"] == "bad_config"
        assert predict(backend, [], config).json()["error"] == "bad_config"


def test_strips_parse_through_the_api(backend):
    for size in ((3000, 1), (1, 3000)):
        answer = requests.post(backend.url + "/api/parse", auth=basic(WEB_USER, WEB_PASSWORD), data=png(*size),
                               timeout=300)
        assert answer.status_code == 200, answer.text
        assert (answer.json()["width"], answer.json()["height"]) == size


def test_body_and_task_limits(backend, image_host):
    # An interactive request carries the task with all its stored regions: ~3.2 MB for 1280x720; it fits.
    regions = [{"id": f"r{i}", "type": "polygonlabels", "value": {"points": [[i % 100, 5.5]] * 40}}
               for i in range(6500)]
    task = {"id": 1, "data": {"image": f"{image_host.url}/ok.png"}, "predictions": [{"result": regions}]}
    big = predict(backend, [task])
    assert len(big.request.body) > 3_000_000 and big.status_code == 200 and big.json()["results"][0] != []
    # 40 MB declared: refused from the headers, before a byte of the body is read.
    conn = http.client.HTTPConnection(backend.url.split("//")[1], timeout=60)
    conn.putrequest("POST", "/predict")
    for name, value in {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
                        "Content-Type": "application/json", "Content-Length": str(40 * 1024 * 1024)}.items():
        conn.putheader(name, value)
    conn.endheaders()
    huge = conn.getresponse()
    assert huge.status == 413 and json.loads(huge.read())["error"] == "request_too_large"
    conn.close()
    many = predict(backend, [{"id": i, "data": {"image": "x"}} for i in range(51)])
    assert many.status_code == 413 and many.json()["error"] == "too_many_tasks"


def test_chunked_upload_over_the_limit_is_refused(backend):
    def body():
        for _ in range(20):
            yield PNG + b"\0" * 50_000           # 1 MB in all, chunked (no Content-Length), limit 300 kB
    answer = requests.post(backend.url + "/api/parse", auth=basic(WEB_USER, WEB_PASSWORD), data=body(), timeout=120)
    assert answer.status_code == 413 and answer.json()["error"] == "upload_too_large"
    small = requests.post(backend.url + "/api/parse", auth=basic(WEB_USER, WEB_PASSWORD), data=iter([PNG]),
                          timeout=300)
    assert small.status_code == 200 and small.json()["width"] == 40, small.text     # chunked, within the limit
