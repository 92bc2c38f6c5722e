"""`unison serve`: OpenAI's Videos API through the official `openai` client, every bad request in a
table, the queue cap under a burst, delete of a running job, durability across SIGKILL and a
restart, a Ray engine's rank killed mid-job, and the status page in headless Chromium.

One server (tiny Wan 2.1, 2 steps, a bearer token) serves the module's API tests; the tests that
kill or restart a server start their own. Videos are compared with `unison generate` of the same
settings, frame for frame (decoded uint8); step counts come from the fault injector's step log
(engine/io/faults.py: the scheduler's own calls), not from the server's reports.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serving import TOKEN, Server, files_of, long_job, wait_for, wait_step
from unison.engine.io.faults import steps_computed
from unison.engine.io.video import video_frames
from unison.launch.cli import main
from unison.launch.jobs import Manifest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client marks the Sora API deprecated

STEPS = 2
CAP = 12
"""The shared server's unfinished jobs per client (the burst's cap)."""


def _frames(path: Path) -> np.ndarray:
    return np.stack(list(video_frames(path, what="test")))


def _png(width: int, height: int, color=(200, 40, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.new("RGB", (width, height), color)
    image.paste((20, 160, 220), (0, 0, width // 2, height // 2))  # not flat: the encoder sees an edge
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _generate(tmp: Path, name: str, *args: str) -> Path:
    """`unison generate` of the settings a served job used (the shared server's recipe)."""
    out = tmp / f"{name}.mp4"
    assert main(["generate", "--steps", str(STEPS), "--output", str(out), *args]) == 0
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The shared server: tiny Wan 2.1 at 2 steps, a token, one adapter, small upload limits."""
    from test_lora import _tiny_lora

    tmp = tmp_path_factory.mktemp("serve")
    lora = _tiny_lora(tmp, "wan", seed=5, name="style.safetensors")
    book = tmp / "faults"
    book.mkdir()
    server = Server(tmp / "store", "--steps", str(STEPS), "--max-queued-per-client", str(CAP),
                    "--max-upload-mb", "0.25", "--max-picture-side", "512", "--adapter", f"style={lora}",
                    env={"UNISON_FAULTS": "[]", "UNISON_FAULTS_DIR": str(book)})
    server.book = book
    server.lora = lora
    server.start()
    yield server
    server.kill()


# -- the openai client ----------------------------------------------------------------------------

def test_openai_client_creates_polls_lists_downloads_and_deletes(served, tmp_path):
    client = served.client()
    video = client.videos.create(prompt="a red panda in the snow", size="64x64", seconds="0.5",
                                 extra_body={"seed": 7, "cache": {"kind": "fbcache", "threshold": 0.05}})
    assert video.object == "video" and video.status in ("queued", "in_progress") and video.id.startswith("video_")
    assert (video.size, video.seconds, video.model) == ("64x64", "0.5", "tiny-wan")
    done = client.videos.poll(video.id, poll_interval_ms=100)
    assert done.status == "completed" and done.progress == 100 and done.completed_at >= done.created_at
    assert done.model_extra["attempts"] == 1

    listed = [v.id for v in client.videos.list(order="desc", limit=100)]
    assert video.id in listed

    clip = tmp_path / "served.mp4"
    clip.write_bytes(client.videos.download_content(video.id).content)
    frames = _frames(clip)
    assert frames.shape == (9, 64, 64, 3)  # 0.5 s at Wan's 16 fps: 9 frames
    reference = _generate(tmp_path, "reference", "--prompt", "a red panda in the snow", "--seed", "7",
                          "--height", "64", "--width", "64", "--frames", "9", "--cache", "fbcache",
                          "--set", "cache.threshold=0.05")
    assert np.array_equal(frames, _frames(reference))

    from PIL import Image

    thumb = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="thumbnail").content))
    assert thumb.format == "JPEG" and thumb.size == (64, 64)
    # The thumbnail is the first frame (JPEG at quality 90: within a few levels on average).
    assert np.abs(np.asarray(thumb, dtype=float) - frames[0].astype(float)).mean() < 6
    sheet = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="spritesheet").content))
    assert sheet.format == "JPEG" and sheet.size == (4 * 160, 3 * 160)  # 9 frames, 4 a row, 160 px each

    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    assert not [p for p in served.out.rglob(f"{video.id}*")]


def test_list_pages_with_after_and_the_lora_field(served, tmp_path):
    """Three videos, one with the served adapter: pages of one in both orders; the LoRA video
    equals `unison generate --lora` of the same file."""
    client = served.client()
    made = [client.videos.create(prompt=f"clip {i}", extra_body={"seed": i, "frames": 5}).id for i in range(2)]
    made.append(client.videos.create(prompt="clip lora", extra_body={"seed": 2, "frames": 5,
                                                                     "lora": ["style:0.5"]}).id)
    for video_id in made:
        assert wait_for(client, video_id).status == "completed"
    first = client.videos.list(limit=1, order="asc")
    assert len(first.data) == 1 and first.has_more
    ascending = [v.id for v in client.videos.list(limit=1, order="asc")]  # the iterator follows `after`
    assert [i for i in ascending if i in made] == made
    descending = [v.id for v in client.videos.list(limit=2, order="desc")]
    assert [i for i in descending if i in made] == made[::-1]

    clip = tmp_path / "lora.mp4"
    clip.write_bytes(client.videos.download_content(made[2]).content)
    reference = _generate(tmp_path, "lora", "--prompt", "clip lora", "--seed", "2", "--frames", "5",
                          "--lora", f"{served.lora}:0.5")
    without = _generate(tmp_path, "plain", "--prompt", "clip lora", "--seed", "2", "--frames", "5")
    assert np.array_equal(_frames(clip), _frames(reference))
    assert not np.array_equal(_frames(reference), _frames(without))  # the adapter changed the video


def test_json_bodies_and_data_urls_are_taken_too(served):
    """A JSON body (another client's way) with typed fields; a picture as a data: URL is checked
    as an upload is (here refused: Wan 2.1 T2V takes no picture)."""
    headers = {**served.headers(), "Content-Type": "application/json"}
    body = {"prompt": "json clip", "frames": 5, "seed": 1, "steps": 1}
    response = httpx.post(served.url + "/v1/videos", headers=headers, content=json.dumps(body), timeout=60)
    assert response.status_code == 200, response.text
    assert wait_for(served.client(), response.json()["id"]).status == "completed"
    url = "data:image/png;base64," + base64.b64encode(_png(64, 64)).decode()
    refused = httpx.post(served.url + "/v1/videos", headers=headers, timeout=60,
                         content=json.dumps({"prompt": "x", "input_reference": {"image_url": url}}))
    assert refused.status_code == 400 and "image" in refused.json()["error"]["message"]


def test_a_render_that_fails_reads_failed_once_with_its_error(served):
    """Latents gone infinite (guidance 1e38) fail the same way on every attempt: failed at once,
    not retried, its error in OpenAI's error object; its content is 409."""
    client = served.client()
    video = client.videos.create(prompt="too much guidance", extra_body={"guidance": 1e38, "frames": 5})
    failed = wait_for(client, video.id)
    assert failed.status == "failed" and failed.progress == 0
    assert failed.error.code == "render_failed" and "NaN or infinity" in failed.error.message
    records = [r for r in Manifest(served.out).records() if r.id == video.id]
    assert [(r.status, r.attempts) for r in records] == [("failed", 1)]
    response = httpx.get(f"{served.url}/v1/videos/{video.id}/content", headers=served.headers(), timeout=30)
    assert response.status_code == 409
    assert not (served.out / f"{video.id}.mp4").exists()
    client.videos.delete(video.id)


# -- bad requests ---------------------------------------------------------------------------------

def _form(**fields):
    return {"data": fields}


BAD = [
    # (name, method, path, request kwargs, status, a word the message holds)
    ("no prompt", "POST", "/v1/videos", _form(size="64x64"), 400, "prompt"),
    ("empty prompt", "POST", "/v1/videos", _form(prompt="  "), 400, "prompt"),
    ("unknown field", "POST", "/v1/videos", _form(prompt="x", colour="red"), 400, "colour"),
    ("a path field", "POST", "/v1/videos", _form(prompt="x", image="/etc/passwd"), 400, "image"),
    ("size not WxH", "POST", "/v1/videos", _form(prompt="x", size="64by64"), 400, "size"),
    ("frames not 4k+1", "POST", "/v1/videos", _form(prompt="x", frames="8"), 400, "4k+1"),
    ("seconds off the frame grid", "POST", "/v1/videos", _form(prompt="x", seconds="0.3"), 400, "seconds"),
    ("seconds and frames", "POST", "/v1/videos", _form(prompt="x", seconds="0.5", frames="9"), 400, "not both"),
    ("steps not a number", "POST", "/v1/videos", _form(prompt="x", steps="many"), 400, "steps"),
    ("seed not whole", "POST", "/v1/videos", _form(prompt="x", seed="1.5"), 400, "seed"),
    ("guidance not finite", "POST", "/v1/videos", _form(prompt="x", guidance="nan"), 400, "guidance"),
    ("unknown cache", "POST", "/v1/videos", _form(prompt="x", cache="nosuch"), 400, "nosuch"),
    ("unknown adapter", "POST", "/v1/videos", _form(prompt="x", lora="nosuch"), 400, "style"),
    ("another model", "POST", "/v1/videos", _form(prompt="x", model="sora-2"), 400, "tiny-wan"),
    ("size the model refuses", "POST", "/v1/videos", _form(prompt="x", size="63x64"), 400, "width"),
    ("not a picture", "POST", "/v1/videos", {"data": {"prompt": "x"}, "files": {"input_reference": ("a.png", b"not")}},
     400, "picture"),
    ("a picture to a text-to-video model", "POST", "/v1/videos",
     {"data": {"prompt": "x"}, "files": {"input_reference": ("a.png", _png(64, 64), "image/png")}}, 400, "image"),
    ("a file under another name", "POST", "/v1/videos",
     {"data": {"prompt": "x"}, "files": {"other": ("a.png", _png(8, 8), "image/png")}}, 400, "input_reference"),
    ("picture side past the limit", "POST", "/v1/videos",
     {"data": {"prompt": "x"}, "files": {"input_reference": ("a.png", _png(600, 8), "image/png")}}, 413, "512"),
    ("body past the limit", "POST", "/v1/videos",
     {"data": {"prompt": "x"}, "files": {"input_reference": ("a.bin", bytes(300_000))}}, 413, "larger"),
    ("a remote picture url", "POST", "/v1/videos",
     {"json": {"prompt": "x", "input_reference": {"image_url": "http://example.com/a.png"}}}, 400, "data:"),
    ("a file id", "POST", "/v1/videos", {"json": {"prompt": "x", "input_reference": {"file_id": "f1"}}}, 400, "upload"),
    ("json not an object", "POST", "/v1/videos", {"json": ["prompt"]}, 400, "object"),
    ("json typed wrong", "POST", "/v1/videos", {"json": {"prompt": 3}}, 400, "prompt"),
    ("plain text body", "POST", "/v1/videos", {"content": b"prompt=x", "headers": {"Content-Type": "text/plain"}},
     400, "multipart"),
    ("unknown video", "GET", "/v1/videos/video_0123456789abcdef0123456789abcdef", {}, 404, "no video"),
    ("a path for an id", "GET", "/v1/videos/..%2F..%2Fmanifest.jsonl", {}, 404, ""),
    ("content of an unknown video", "GET", "/v1/videos/video_0123456789abcdef0123456789abcdef/content", {}, 404, ""),
    ("delete an unknown video", "DELETE", "/v1/videos/video_0123456789abcdef0123456789abcdef", {}, 404, "no video"),
    ("limit 0", "GET", "/v1/videos?limit=0", {}, 400, "limit"),
    ("order sideways", "GET", "/v1/videos?order=up", {}, 400, "order"),
    ("after an unknown id", "GET", "/v1/videos?after=video_x", {}, 400, "after"),
    ("unknown query", "GET", "/v1/videos?page=2", {}, 400, "page"),
    ("unknown path", "GET", "/v1/images", {}, 404, ""),
    ("wrong method", "PUT", "/v1/videos", {}, 405, ""),
]


@pytest.mark.parametrize("name,method,path,kwargs,status,word", BAD, ids=[b[0] for b in BAD])
def test_bad_request_table(served, name, method, path, kwargs, status, word):
    before = files_of(served.out)
    count = len(served.client().videos.list(limit=100).data)
    kwargs = dict(kwargs)
    headers = {**served.headers(), **kwargs.pop("headers", {})}
    response = httpx.request(method, served.url + path, headers=headers, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    assert word.lower() in error["message"].lower(), error
    assert files_of(served.out) == before  # nothing written
    assert len(served.client().videos.list(limit=100).data) == count


def test_token_is_required_and_compared(served):
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        response = httpx.get(served.url + "/v1/videos", headers=headers, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="wrong-token-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.videos.list()
    assert httpx.get(served.url + "/", timeout=30).status_code == 200  # the page itself holds no job data


def test_refusals_before_loading(served, tmp_path, capsys, monkeypatch):
    """A reachable address without a token, a short token, Ray-only flags, a missing adapter, and a
    second server on a store in use: one line each (exit 2), nothing written."""
    monkeypatch.delenv("UNISON_SERVE_TOKEN", raising=False)
    before = files_of(served.out)
    assert main(["serve", "--out", str(served.out), "--port", "0"]) == 2
    assert "in use" in capsys.readouterr().err and files_of(served.out) == before
    assert main(["serve", "--out", str(tmp_path / "s"), "--host", "0.0.0.0"]) == 2
    assert "token" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    assert main(["serve", "--out", str(tmp_path / "s"), "--token", "short"]) == 2
    assert main(["serve", "--out", str(tmp_path / "s"), "--engines", "2"]) == 2
    assert main(["serve", "--out", str(tmp_path / "s"), "--adapter", "x=/no/such.safetensors"]) == 2
    assert not (tmp_path / "s").exists()


# -- delete of a running job, and the queue cap ----------------------------------------------------

def test_delete_stops_a_running_job_and_the_next_job_is_untouched(served, tmp_path):
    client = served.client()
    long = long_job(client)
    assert client.videos.delete(long).deleted
    after = client.videos.create(prompt="after the cancel", extra_body={"seed": 11, "frames": 5})
    assert wait_for(client, after.id).status == "completed"
    computed = steps_computed(served.book)
    assert 3 <= sum(computed[long].values()) < 400  # stopped early, counted by the scheduler's calls
    assert computed[after.id] == {0: STEPS}  # the next job ran whole: the stop did not reach it
    assert not [p for p in served.out.rglob(f"{long}*")]  # its checkpoint and record gone
    assert long not in {r.id for r in Manifest(served.out).records()}
    clip = tmp_path / "after.mp4"
    clip.write_bytes(client.videos.download_content(after.id).content)
    reference = _generate(tmp_path, "after", "--prompt", "after the cancel", "--seed", "11", "--frames", "5")
    assert np.array_equal(_frames(clip), _frames(reference))


def test_burst_of_200_requests_past_the_queue_cap(served):
    """200 creates at once from one client, at most CAP unfinished: every answer is 200 or 429,
    every accepted job completes exactly once, nothing of a refused one is written."""
    client = served.client()
    before = {v.id for v in client.videos.list(limit=100)}  # every page

    def create(i: int):
        return httpx.post(served.url + "/v1/videos", headers=served.headers(), timeout=120,
                          files={"prompt": (None, f"burst {i}"), "frames": (None, "1"), "steps": (None, "1"),
                                 "seed": (None, str(i))})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(create, range(200)))
    statuses = [r.status_code for r in responses]
    accepted = [r.json()["id"] for r in responses if r.status_code == 200]
    assert set(statuses) <= {200, 429} and statuses.count(200) + statuses.count(429) == 200
    assert CAP <= len(accepted) < 200 and len(set(accepted)) == len(accepted)
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "rate_limit_error" and r.headers["retry-after"]
    for video_id in accepted:
        assert wait_for(served.client(), video_id, timeout=300).status == "completed"
    records = Manifest(served.out).records()
    done = [r.id for r in records if r.status == "done" and r.id in set(accepted)]
    assert sorted(done) == sorted(accepted)  # each rendered once
    jobs = {p.stem for p in (served.out / "jobs").glob("*.json")}
    assert jobs == before | set(accepted)  # the refused left no record
    videos = {p.stem for p in served.out.glob("video_*.mp4")}
    assert set(accepted) <= videos and videos <= jobs


def test_restart_renders_nothing_twice(served):
    """SIGTERM (exit 0), then the same command: every completed video is still completed and no
    step is computed again (the scheduler's step log is unchanged)."""
    completed = {v.id for v in served.client().videos.list(limit=100) if v.status == "completed"}
    assert len(completed) > CAP
    steps = steps_computed(served.book)
    assert served.stop() == 0
    served.start()
    again = {v.id: v.status for v in served.client().videos.list(limit=100)}  # every page
    assert {i for i, status in again.items() if status == "completed"} == completed
    time.sleep(1.0)
    assert steps_computed(served.book) == steps


# -- the status page ------------------------------------------------------------------------------

def test_status_page_in_headless_chromium(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    picture = tmp_path / "p.png"
    picture.write_bytes(_png(64, 64))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(served.url + "/")
        page.wait_for_selector("#token-row", state="visible")
        page.fill("#token", TOKEN)
        page.dispatch_event("#token", "change")
        page.fill("#prompt", "a lantern over a pond, from the page")
        page.fill("#seed", "4")
        page.click("#submit")
        page.wait_for_function("document.getElementById('message').textContent.startsWith('accepted')")
        video_id = page.inner_text("#message").split()[-1]
        row = f"tr[data-id='{video_id}']"
        page.wait_for_selector(f"{row}[data-status='completed'] img.thumb", timeout=120_000)
        page.wait_for_function(f"document.querySelector(\"{row} img.thumb\").naturalWidth === 64")
        assert page.locator(f"{row} video").count() == 1
        assert page.inner_text(f"{row} td.prompt") == "a lantern over a pond, from the page"
        assert "100%" in page.inner_text(row)
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        # A job cancelled from the page: its row goes, and the API no longer knows it.
        doomed = served.client().videos.create(prompt="cancel me", extra_body={"steps": 400, "frames": 5})
        page.wait_for_selector(f"tr[data-id='{doomed.id}'][data-status='in_progress'] button.cancel")
        page.click(f"tr[data-id='{doomed.id}'] button.cancel")
        page.wait_for_selector(f"tr[data-id='{doomed.id}']", state="detached")
        browser.close()
    with pytest.raises(openai.NotFoundError):
        served.client().videos.retrieve(doomed.id)
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[1] == 1200 and image.std() > 10  # drawn, not blank
    clip = served.out / f"{video_id}.mp4"
    reference = _generate(tmp_path, "page", "--prompt", "a lantern over a pond, from the page", "--seed", "4")
    assert np.array_equal(_frames(clip), _frames(reference))


# -- durability: a killed server, a killed Ray rank ------------------------------------------------

def test_sigkill_mid_render_then_restart_completes_the_jobs_once(tmp_path):
    """An image-to-video job (its picture uploaded) is held at step 1 while a second job queues
    behind it, then its server is SIGKILLed as step 3 of 6 begins. The same command resumes the
    first from its step-3 checkpoint (6 steps computed in all; the video equals `unison generate
    --image` of the same picture) and renders the queued one; each is done exactly once."""
    book, gate = tmp_path / "faults", tmp_path / "go"
    book.mkdir()
    faults = [{"job": "*", "step": 1, "action": "pause", "until": str(gate)}, {"job": "*", "step": 3, "action": "kill"}]
    env = {"UNISON_FAULTS": json.dumps(faults), "UNISON_FAULTS_DIR": str(book)}
    args = ("--set", "model.family=wan-i2v", "--steps", "6", "--set", "output.checkpoint_every=1")
    picture = tmp_path / "first.png"
    picture.write_bytes(_png(64, 64))
    with Server(tmp_path / "store", *args, env=env).start() as first:
        response = httpx.post(first.url + "/v1/videos", headers=first.headers(), timeout=60,
                              data={"prompt": "a kite", "seed": "5"},
                              files={"input_reference": ("first.png", picture.read_bytes(), "image/png")})
        assert response.status_code == 200, response.text
        video_id = response.json()["id"]
        wait_step(first.client(), video_id, at_least=2)  # held there (step index 1) by the pause
        unfinished = httpx.get(f"{first.url}/v1/videos/{video_id}/content", headers=first.headers(), timeout=30)
        assert unfinished.status_code == 409 and unfinished.json()["error"]["code"] == "video_not_ready"
        queued = httpx.post(first.url + "/v1/videos", headers=first.headers(), timeout=60,
                            data={"prompt": "a second kite", "seed": "6"},
                            files={"input_reference": ("first.png", picture.read_bytes(), "image/png")}).json()
        assert queued["status"] == "queued" and queued["queue_position"] == 0
        gate.touch()
        assert first.wait_exit(120) == -9  # the injected SIGKILL
    for job in (video_id, queued["id"]):  # accepted means on disk
        assert (tmp_path / "store" / "jobs" / f"{job}.json").is_file()
    with Server(tmp_path / "store", *args, env=env).start() as second:  # each fault fires once: not again
        for job in (video_id, queued["id"]):
            assert wait_for(second.client(), job).status == "completed"
        clip = tmp_path / "served.mp4"
        clip.write_bytes(second.client().videos.download_content(video_id).content)
        assert second.stop() == 0
    records = Manifest(tmp_path / "store").records()
    assert [(r.id, r.status, r.resumed_from_step, r.steps) for r in records] == [
        (video_id, "done", 3, 3), (queued["id"], "done", 0, 6)]
    assert steps_computed(book) == {video_id: {0: 6}, queued["id"]: {0: 6}}  # nothing computed twice
    out = tmp_path / "reference.mp4"
    assert main(["generate", "--set", "model.family=wan-i2v", "--steps", "6", "--prompt", "a kite", "--seed", "5",
                 "--image", str(picture), "--output", str(out)]) == 0
    assert np.array_equal(_frames(clip), _frames(out))


def test_ray_rank_killed_mid_job_resumes_on_the_rebuilt_engine(tmp_path):
    """One Ray engine of 2 ranks (Ulysses 2); rank 1 is SIGKILLed as step 2 of 4 begins: the engine
    is rebuilt and the job resumes there from its step-2 checkpoint; the video equals a one-rank
    `unison generate` frame for frame."""
    pytest.importorskip("ray")
    book = tmp_path / "faults"
    book.mkdir()
    env = {"UNISON_FAULTS": json.dumps([{"job": "*", "step": 2, "action": "kill", "rank": 1}]),
           "UNISON_FAULTS_DIR": str(book), "OMP_NUM_THREADS": "1"}
    with Server(tmp_path / "store", "--ray", "local", "--ulysses", "2", "--steps", "4", "--set",
                "output.checkpoint_every=1", "--set", "parallel.timeout_s=60", env=env).start(ready_s=300) as server:
        client = server.client()
        video = client.videos.create(prompt="a lighthouse at dusk", extra_body={"seed": 9})
        assert wait_for(client, video.id, timeout=300).status == "completed"
        assert client.videos.retrieve(video.id).model_extra["attempts"] == 2
        clip = tmp_path / "served.mp4"
        clip.write_bytes(client.videos.download_content(video.id).content)
        # A job deleted mid-render stops on both ranks; the engine, whole, takes the next job.
        long = long_job(client, timeout=120)
        assert client.videos.delete(long).deleted
        after = client.videos.create(prompt="after the cancel", extra_body={"seed": 1, "frames": 5})
        assert wait_for(client, after.id, timeout=120).status == "completed"
        assert server.stop() == 0
    records = [r for r in Manifest(tmp_path / "store").records() if r.id == video.id]
    # The retry's error is whichever rank's came first: the dead actor's, or rank 0's broken collective.
    assert [r.status for r in records] == ["retry", "done"] and records[0].error
    assert records[1].resumed_from_step == 2
    computed = steps_computed(book)
    assert computed[video.id] == {0: 4, 1: 4}  # steps 1-2, then 3-4 on the new engine
    assert computed[long][0] == computed[long][1] and 3 <= computed[long][0] < 400
    assert computed[after.id] == {0: 4, 1: 4}
    assert server.output().count("is rebuilt after") == 1  # the kill's; the cancel kept the engine
    assert long not in {r.id for r in Manifest(tmp_path / "store").records()}
    out = tmp_path / "reference.mp4"
    assert main(["generate", "--steps", "4", "--prompt", "a lighthouse at dusk", "--seed", "9",
                 "--output", str(out)]) == 0
    assert np.array_equal(_frames(clip), _frames(out))


def test_torchrun_world_serves_as_one_engine(tmp_path):
    """torchrun, 2 ranks (Ulysses 2): rank 0 serves, both render; a video equals the one-rank
    `unison generate` frame for frame; a running job deleted stops on both ranks at the same step
    (the step log counts each rank's steps) and the next job runs whole on both."""
    book = tmp_path / "faults"
    book.mkdir()
    with Server(tmp_path / "store", "--ulysses", "2", "--steps", "3", torchrun=2,
                env={"UNISON_FAULTS": "[]", "UNISON_FAULTS_DIR": str(book), "OMP_NUM_THREADS": "1"}).start() as server:
        client = server.client()
        long = long_job(client, timeout=120)
        assert client.videos.delete(long).deleted
        video = client.videos.create(prompt="a harbour at noon", extra_body={"seed": 6})
        assert wait_for(client, video.id, timeout=180).status == "completed"
        clip = tmp_path / "served.mp4"
        clip.write_bytes(client.videos.download_content(video.id).content)
        server.stop()
    computed = steps_computed(book)
    stopped = computed[long]
    assert stopped[0] == stopped[1] and 3 <= stopped[0] < 400  # both ranks stopped at the same step
    assert computed[video.id] == {0: 3, 1: 3}
    assert [r.id for r in Manifest(tmp_path / "store").records()] == [video.id]
    out = tmp_path / "reference.mp4"
    assert main(["generate", "--steps", "3", "--prompt", "a harbour at noon", "--seed", "6",
                 "--output", str(out)]) == 0
    assert np.array_equal(_frames(clip), _frames(out))
