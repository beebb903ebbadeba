"""Models by Hugging Face Hub id (minidb/hub.py), against a fake Hub on 127.0.0.1.

The fake Hub is a thread with http.server that answers the four kinds of request huggingface_hub
makes (the revision's commit, the file list at a commit, HEAD and GET of a file) over a few repositories
held in memory, one of them a tiny diffusers model that diffusers itself saved. HF_ENDPOINT points at
it and HF_HOME / HF_HUB_CACHE at the test's own folder, so neither the internet nor the user's cache
is ever touched. huggingface_hub reads those variables once, when it is imported, so the values it
read (huggingface_hub.constants) are patched too, and monkeypatch puts everything back afterwards.
"""

import errno
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from huggingface_hub import constants
from PIL import Image
from safetensors.torch import load_file

from minidb import hub
from minidb.dreambooth import _model_identity
from minidb.files import ModelFileError
from minidb.load import load
from minidb.detect import is_sdxl
from minidb.options import check, parse_args
from test_bad_input import one_sentence
from test_load_save import reference_pipeline

ROOT = Path(__file__).resolve().parent.parent
UNET_FP16 = "unet/diffusion_pytorch_model.fp16.safetensors"
DECOYS = {  # in the repository, never to be downloaded
    "v1-5-pruned-emaonly.safetensors": b"a root single file: 4 GB on the real Hub",
    "text_encoder/pytorch_model.bin": b"a pickle beside the safetensors file",
    "safety_checker/config.json": b"{}", "safety_checker/model.safetensors": b"not minidb's",
    "feature_extractor/preprocessor_config.json": b"{}", "README.md": b"# tiny", ".gitattributes": b"",
}


def commit_of(repo, revision):
    return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()  # 40 hex digits, as a git commit


class FakeHub:
    """Repositories in memory, served in the Hub's URL layout; every request is written down."""

    def __init__(self):
        self.branches = {}  # repo -> {revision name: commit}
        self.files = {}  # commit -> {path: bytes}
        self.gated = set()
        self.requests = []  # (method, path)
        self.faults = {}  # repo -> (file, fault): how GET (and HEAD) of that file or the repo's API goes wrong
        self.release = threading.Event()  # set at the end: lets a stalled answer finish

    def add(self, repo, files, revision="main"):
        commit = commit_of(repo, revision)
        self.branches.setdefault(repo, {})[revision] = commit
        self.files[commit] = files

    def downloads(self):
        """The paths of the files that were sent (GET), and of all file requests (GET and HEAD)."""
        files = [(m, p.split("/", 5)[5]) for m, p in self.requests if "/resolve/" in p]
        return sorted(p for m, p in files if m == "GET"), files

    def answer(self, method, path):
        """(status, headers, body) for one request, as the Hub would answer it."""
        self.requests.append((method, path))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):  # the revision's commit
            repo, commit, problem = self.find(*m.groups())
            if problem:
                return problem
            files = [{"rfilename": p} for p in self.files[commit]]
            return 200, {}, json.dumps({"id": repo, "sha": commit, "private": False, "siblings": files}).encode()
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):  # the file list at a commit
            repo, commit, problem = self.find(*m.groups())
            if problem:
                return problem
            tree = [{"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for p, data in self.files[commit].items()]
            folders = {p.rsplit("/", 1)[0] for p in self.files[commit] if "/" in p}
            tree += [{"type": "directory", "path": f, "oid": commit} for f in sorted(folders)]
            return 200, {}, json.dumps(tree).encode()
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):  # a file
            repo, commit, problem = self.find(m[1], m[2])
            if problem:
                return problem
            if repo in self.gated:
                return 401, {"X-Error-Code": "GatedRepo", "X-Repo-Commit": commit}, b""
            if m[3] not in self.files[commit]:
                return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, b""
            data = self.files[commit][m[3]]
            return 200, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, data
        return 404, {}, b"{}"  # e.g. huggingface_hub's /api/agent-harnesses, which it can do without

    def find(self, repo, revision):
        """(repo, commit, None), or (.., .., the error response) for an unknown repository or revision."""
        if repo not in self.branches:  # the real Hub answers 401 both for missing and for private repos
            return repo, None, (401, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}')
        revision = revision or "main"
        commit = revision if revision in self.branches[repo].values() else self.branches[repo].get(revision)
        if commit is None:
            return repo, None, (404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "Invalid rev id"}')
        return repo, commit, None


def handler(fake):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.reply(send_body=True)

        def do_HEAD(self):
            self.reply(send_body=False)

        def reply(self, send_body):
            path = unquote(urlsplit(self.path).path)
            status, headers, body = fake.answer(self.command, path)
            repo = re.match(r"/(?:api/models/)?([^/]+/[^/]+)", path)
            file, fault = fake.faults.get(repo and repo[1], (None, None))
            if fault and (path.endswith(f"/{file}") if file else path.startswith("/api/models/")):
                if isinstance(fault, int):  # the server answers this status
                    status, headers, body = fault, {}, b"Internal Server Error"
                elif fault == "html":  # a proxy's or captive portal's page, with 200
                    status, headers, body = 200, {"Content-Type": "text/html"}, b"<html>Log in to the network</html>"
                elif fault == "short" and send_body:  # less than the file list says, with a matching Content-Length
                    body = body[:len(body) // 2]
                elif fault in ("cut", "stall") and send_body:  # Content-Length of it all, then half of it / a hang
                    self.send_response(status)
                    for key, value in {**headers, "Content-Length": str(len(body))}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body[:len(body) // 2 if fault == "cut" else 1000])
                    self.wfile.flush()
                    self.close_connection = True
                    if fault == "stall":
                        fake.release.wait(timeout=30)
                    return
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def log_message(self, *args):  # quiet
            pass
    return Handler


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the folder diffusers saved, its files as the fake Hub serves them)."""
    tmp = tmp_path_factory.mktemp("hub")
    pipe = reference_pipeline("SD 1.x", tmp)
    pipe.save_pretrained(tmp / "diffusers")
    pipe.unet.to(torch.float16).save_pretrained(tmp / "diffusers" / "unet", variant="fp16")
    folder = tmp / "diffusers"
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    assert UNET_FP16 in files and "unet/diffusion_pytorch_model.safetensors" in files
    return folder, {**files, **DECOYS}


@pytest.fixture(scope="module")
def fake_hub(tiny):
    folder, files = tiny
    fake = FakeHub()
    fake.add("owner/tiny", files)
    scheduler = json.loads(files["scheduler/scheduler_config.json"])  # a second revision: v-prediction
    fake.add("owner/tiny", {**files, "scheduler/scheduler_config.json":
                            json.dumps({**scheduler, "prediction_type": "v_prediction"}).encode()}, revision="v1")
    fake.add("owner/gated", files)
    fake.gated.add("owner/gated")
    fake.add("owner/noweights", {p: d for p, d in files.items() if not p.startswith("text_encoder/") or
                                 p.endswith("config.json")})
    fake.add("owner/single", {"model.safetensors": b"a single file", "README.md": b"#"})
    pickled = io.BytesIO()  # a text encoder saved only as a pickle, as old repositories have it
    torch.save(load_file(folder / "text_encoder" / "model.safetensors"), pickled)
    fake.add("owner/pickled", {**{p: d for p, d in files.items() if not p.startswith("text_encoder/model.")},
                               "text_encoder/pytorch_model.bin": pickled.getvalue()})
    for name, file, fault in [("cut", UNET_FP16, "cut"), ("stall", UNET_FP16, "stall"), ("short", UNET_FP16, "short"),
                              ("portal", None, "html"), ("err500", UNET_FP16, 500), ("err404", UNET_FP16, 404)]:
        fake.add(f"owner/{name}", files)
        fake.faults[f"owner/{name}"] = (file, fault)
    fake.add("owner/novae", {p: d for p, d in files.items() if not p.startswith("vae/")})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(fake))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    fake.release.set()
    server.shutdown()
    server.server_close()


def point_hub_at(monkeypatch, endpoint, home):
    """HF_ENDPOINT and the Hugging Face cache, for subprocesses (the environment) and for this one
    (the values huggingface_hub read at import)."""
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    values = {"ENDPOINT": endpoint,
              "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}", "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": False,
              "HF_HUB_DISABLE_TELEMETRY": True, "HF_TOKEN_PATH": str(home / "token"),
              "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
              "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json")}
    for key, value in values.items():
        assert hasattr(constants, key), key  # a rename in huggingface_hub must not go unnoticed
        monkeypatch.setattr(constants, key, value)
    monkeypatch.setattr(hub, "_resolved", {})  # what this process resolved before belongs to another cache


@pytest.fixture
def env(fake_hub, tmp_path, monkeypatch):
    point_hub_at(monkeypatch, fake_hub.url, tmp_path / "hf")
    fake_hub.requests.clear()
    return fake_hub


def a_new_run(monkeypatch, fake):
    """What a second process would see: the same cache, nothing resolved yet, no requests so far."""
    monkeypatch.setattr(hub, "_resolved", {})
    fake.requests.clear()


def failure(model):
    with pytest.raises(ModelFileError) as e:
        hub.local_path(model)
    return one_sentence(e)


# ---- resolution and what is downloaded ----

def test_hub_id_loads_the_same_model_as_the_folder(env, tiny):
    folder, files = tiny
    path = Path(hub.local_path("owner/tiny"))
    assert path.name == commit_of("owner/tiny", "main") and path.parent.name == "snapshots"
    expected, model = load(folder), load("owner/tiny")
    assert (model.version, model.prediction_type) == (expected.version, expected.prediction_type)
    assert next(model.unet.parameters()).dtype == torch.float16  # the fp16 variant was the one downloaded
    for part in ("unet", "vae", "text_encoder"):
        got, want = getattr(model, part).state_dict(), getattr(expected, part).state_dict()
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k].to(got[k].dtype)), (part, k)
    assert torch.equal(model.tokenizer(["a photo of sks dog"]), expected.tokenizer(["a photo of sks dog"]))


def test_only_the_files_minidb_loads_are_downloaded(env, tiny):
    files = tiny[1]
    hub.local_path("owner/tiny")
    sent, _ = env.downloads()
    wanted = {"model_index.json", "unet/config.json", UNET_FP16, "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
              "scheduler/scheduler_config.json", *(p for p in files if p.startswith("tokenizer/"))}
    assert sent == sorted(wanted)  # each once: no plain fp32 UNet, no .bin, no root file, no safety checker
    assert not set(sent) & set(DECOYS)


def test_a_second_run_downloads_nothing(env, monkeypatch):
    first = hub.local_path("owner/tiny")
    a_new_run(monkeypatch, env)
    assert hub.local_path("owner/tiny") == first
    assert env.downloads()[1] == []  # no GET, not even a HEAD
    assert ("GET", "/api/models/owner/tiny") in env.requests  # the one question: main's commit
    a_new_run(monkeypatch, env)
    assert load("owner/tiny") and hub.local_path("owner/tiny") == first  # load() resolved it: asked once
    assert [r for r in env.requests if r[1].startswith("/api/models")] == [("GET", "/api/models/owner/tiny")]


def test_what_diffusers_downloaded_is_used_as_it_is(env, monkeypatch, tiny):
    """A snapshot that another library downloaded in fp32 (as diffusers does without variant="fp16"):
    minidb uses its files and downloads no fp16 copy beside them."""
    from huggingface_hub import snapshot_download
    snapshot_download("owner/tiny", ignore_patterns=["*.fp16.*", "*.bin", "*.ckpt"])
    a_new_run(monkeypatch, env)
    model = load("owner/tiny")
    assert env.downloads()[1] == [] and next(model.unet.parameters()).dtype == torch.float32


def test_revisions(env, monkeypatch):
    main = Path(hub.local_path("owner/tiny"))
    env.requests.clear()
    v1 = Path(hub.local_path("owner/tiny@v1"))
    assert env.downloads()[0] == ["scheduler/scheduler_config.json"]  # the files v1 shares with main are not sent again
    assert (main.name, v1.name) == (commit_of("owner/tiny", "main"), commit_of("owner/tiny", "v1"))
    assert load("owner/tiny").prediction_type == "epsilon"
    assert load("owner/tiny@v1").prediction_type == "v_prediction"
    assert hub.local_path(f"owner/tiny@{commit_of('owner/tiny', 'v1')}") == str(v1)  # a commit works too
    # the prior cache's key names the commit, so that main moving on makes new class images
    assert _model_identity("owner/tiny") != _model_identity("owner/tiny@v1")
    assert _model_identity("owner/tiny")[0] == str(main.resolve())
    message = failure("owner/tiny@nope")
    assert message.startswith("owner/tiny on the Hugging Face Hub at http://127.0.0.1") and "'nope'" in message


def test_a_pickle_only_where_there_is_nothing_else(env, tiny):
    model = load("owner/pickled")
    assert "text_encoder/pytorch_model.bin" in env.downloads()[0]
    want = load(tiny[0]).text_encoder.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in model.text_encoder.state_dict().items())


# ---- without the Hub ----

def test_offline_loads_what_is_cached_and_says_how_to_get_the_rest(env, monkeypatch):
    cached = hub.local_path("owner/tiny")
    a_new_run(monkeypatch, env)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.local_path("owner/tiny") == cached and load("owner/tiny").version == "SD 1.x"
    for missing in ("owner/tiny@v1", "owner/other"):
        message = failure(missing)
        assert message.startswith(f"{missing} is not in the Hugging Face cache") and "without HF_HUB_OFFLINE" in message
    assert env.requests == []


def test_an_unreachable_hub_is_like_offline(env, monkeypatch, tmp_path):
    cached = hub.local_path("owner/tiny")
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    point_hub_at(monkeypatch, closed, tmp_path / "hf")
    assert hub.local_path("owner/tiny") == cached  # from the cache
    message = failure("owner/other")
    assert message.startswith(f"Could not reach the Hugging Face Hub at {closed}") and "check the network" in message


def test_a_mistyped_local_path_is_named_as_one(env, monkeypatch, tmp_path):
    # runs/dreambooth-9 is also a valid Hub id; with runs/ here, the likely mistake is the path, not the network
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "dreambooth-1").mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    point_hub_at(monkeypatch, closed, tmp_path / "hf")
    message = failure("runs/dreambooth-9")
    assert message.startswith("No model at runs/dreambooth-9: runs/ holds no dreambooth-9") and "check the path" in message
    assert "could not be reached" in message
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = failure("runs/dreambooth-8")
    assert message.startswith("No model at runs/dreambooth-8: runs/ holds no dreambooth-8") and "HF_HUB_OFFLINE" in message


# ---- one sentence for each way it can go wrong ----

def test_missing_gated_and_unusable_repositories(env):
    assert "has no repository owner/nothing" in failure("owner/nothing") and "hf auth login" in failure("owner/nothing")
    assert "is gated" in failure("owner/gated") and "HF_TOKEN" in failure("owner/gated")
    message = failure("owner/noweights")
    assert message.startswith("owner/noweights on the Hugging Face Hub has no weights for its text_encoder")
    assert "is not a diffusers model" in failure("owner/single")
    assert not [p for p in env.downloads()[0] if p.endswith((".safetensors", ".bin"))]  # found out before


@pytest.fixture
def no_waiting(monkeypatch):
    """huggingface_hub's retries without their pauses, and a download that gives up after 0.2 s without data."""
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.2)


def test_downloads_that_fail_midway_end_in_one_sentence(env, no_waiting):
    """A weights file cut off or stalled midway, one shorter than listed, a proxy's page where the API should
    answer: one sentence each that says what failed and what to do (they were tracebacks, exit 1)."""
    site = f"the Hugging Face Hub at {env.url}"
    for repo, what in [("owner/cut", "peer closed connection"), ("owner/stall", "no data came for a while")]:
        message = failure(repo)
        assert message.startswith(f"Could not download {UNET_FP16} of {repo} from {site} ({what}")
        assert message.endswith("check the network (or a proxy, or HF_ENDPOINT) and run again to resume.")
    message = failure("owner/short")
    assert message.startswith(f"Could not download owner/short from {site} (a file came in shorter than the Hub")
    assert message.endswith("run again to resume.")
    message = failure("owner/portal")
    assert message.startswith(f"{site} answered the question about owner/portal with a page that is not the Hub's")


def test_a_cache_that_cannot_be_written_is_named(env, monkeypatch):
    from huggingface_hub import file_download

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", constants.HF_HUB_CACHE)
    monkeypatch.setattr(file_download, "http_get", full)
    message = failure("owner/tiny")
    assert message.startswith("Could not save owner/tiny in the Hugging Face cache (")
    assert "No space left on device); free some space or set HF_HUB_CACHE" in message


def test_hub_errors_say_what_the_hub_answered_and_for_which_file(env, no_waiting):
    message = failure("owner/err500")  # it was "Could not reach ... check the network"
    assert message == (f"the Hugging Face Hub at {env.url} answered HTTP 500 when asked for {UNET_FP16} of "
                       "owner/err500; run again later.")
    message = failure("owner/err404")  # it named no file
    assert message.startswith(f"the Hugging Face Hub at {env.url} answered HTTP 404 when asked for {UNET_FP16} of "
                              "owner/err404, a file its list names; run again later")
    message = failure("owner/novae")  # it named a cache folder, with no fix
    assert message.startswith("owner/novae on the Hugging Face Hub is not a diffusers model (it has no "
                              "vae/config.json); minidb needs a diffusers repository")


def test_what_is_not_a_hub_id_is_left_to_load(env, tmp_path, monkeypatch):
    for model in (str(tmp_path / "nope"), "a/b/c", "weights/nope.safetensors", "nope", "./nope", "../a"):
        assert hub.local_path(model) == model
    (tmp_path / "owner" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.local_path("owner/tiny") == "owner/tiny"  # a local folder that reads like an id is that folder
    assert env.requests == []


# ---- the scripts ----

def test_train_options_take_a_hub_id(env, tmp_path):
    args = parse_args(["--images", str(tmp_path), "--class", "dog", "--model", "owner/tiny", "--class-cache",
                       str(tmp_path / "cache"), "--device", "cpu"], "train.py\n\nusage\n\nmore")
    args.model, args.prior_weight = "owner/tiny", 1.0
    assert check(args) is None and is_sdxl("owner/tiny") is False
    args.model = "owner/nothing"
    assert "has no repository owner/nothing" in check(args) and is_sdxl("owner/nothing") is False


def test_sample_py_draws_with_a_hub_id(env, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", "owner/tiny", "--prompt", "a dog",
                        "--steps", "2", "--height", "32", "--width", "32", "--seed", "1", "--device", "cpu",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ)
    assert r.returncode == 0, r.stderr
    assert "loaded owner/tiny (SD 1.x, epsilon)" in r.stdout
    assert "Model: tiny, RNG: CPU" in Image.open(out / "00000-1.png").text["parameters"]  # no hash for a Hub id
    assert (tmp_path / "hf" / "hub" / "models--owner--tiny").is_dir()  # into the test's cache, not the user's
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", "owner/nothing", "--prompt", "a dog",
                        "--device", "cpu", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=os.environ)
    assert r.returncode == 2 and "has no repository owner/nothing" in r.stderr and "Traceback" not in r.stderr
