"""Hub checkpoints through the real huggingface_hub client, against a fake Hub served on 127.0.0.1."""

import base64
import hashlib
import http.server
import importlib
import json
import math
import re
import socket
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import mlx.core as mx
import numpy as np
import pytest
import yaml
from conftest import TINY_RUN

from bdh_mlx import BDH, BDHConfig, CheckpointError, cli
from bdh_mlx.storage import checkpoint
from bdh_mlx.storage.files import eval_mode
from bdh_mlx.storage.hub import HubError, resolve_checkpoint
from bdh_mlx.training import train


class FakeHub(http.server.ThreadingHTTPServer):
    """The Hub endpoints that ``snapshot_download`` calls, for repos held in memory.

    ``repos[repo_id] = {"refs": {name: sha}, "commits": {sha: {path: bytes}}, "access": "public"|"private"|"gated"}``;
    private and gated repos need ``Authorization: Bearer <token>``.
    """

    def __init__(self, token="hf_good_token"):
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.repos, self.token, self.requests = {}, token, []
        self.url = f"http://127.0.0.1:{self.server_port}"

    def add_repo(self, repo_id, files, revision="main", access="public"):
        """Commit ``files`` (path -> bytes) as ``revision`` of ``repo_id``; returns the commit sha."""
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}, "access": access})
        sha = hashlib.sha1(json.dumps([repo_id, revision, sorted(files)]).encode() + b"".join(
            files[k] for k in sorted(files))).hexdigest()
        repo["refs"][revision] = sha
        repo["commits"][sha] = dict(files)
        return sha


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", headers=None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, status, code):
        self.reply(status, json.dumps({"error": code}).encode(), {"X-Error-Code": code})

    def do_GET(self):
        hub = self.server
        path = unquote(urlsplit(self.path).path)
        hub.requests.append((self.command, path))
        route = (re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/.*)?", path)
                 or re.fullmatch(r"/([^/]+/[^/]+)/(resolve)/([^/]+)/(.+)", path))
        if route is None:
            return self.error(404, "NotFound")
        repo_id, kind, revision = route.group(1, 2, 3)
        repo = hub.repos.get(repo_id)
        authorized = self.headers.get("Authorization") == f"Bearer {hub.token}"
        if repo is None or (repo["access"] == "private" and not authorized):
            return self.error(401 if repo is None or not authorized else 404, "RepoNotFound")
        sha = revision if revision in repo["commits"] else repo["refs"].get(revision)
        if sha is None:
            return self.error(404, "RevisionNotFound")
        files = repo["commits"][sha]
        if kind == "revision":
            siblings = [{"rfilename": name} for name in sorted(files)]
            return self.reply(200, json.dumps({"id": repo_id, "sha": sha, "siblings": siblings}).encode(),
                              {"Content-Type": "application/json"})
        if kind == "tree":
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in sorted(files.items())]
            return self.reply(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
        if repo["access"] == "gated" and not authorized:
            return self.error(401, "GatedRepo")
        name = route.group(4)
        if name not in files:
            return self.error(404, "EntryNotFound")
        data = files[name]
        self.reply(200, data, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                               "Content-Type": "application/octet-stream"})

    do_HEAD = do_GET

    def do_POST(self):
        """Writes (need the token): create a repo, preupload (every file "regular"), commit (ndjson, base64)."""
        hub = self.server
        path = urlsplit(self.path).path
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        hub.requests.append((self.command, path))
        if self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self.error(401, "Unauthorized")
        if path == "/api/validate-yaml":  # the Hub checks a model card's front matter before a commit
            front = re.match(r"---\n(.*?)\n---\n", json.loads(body)["content"], re.S)
            ok = front is not None and isinstance(yaml.safe_load(front.group(1)), dict)
            return self.reply(200 if ok else 400, json.dumps(
                {"errors": [] if ok else [{"message": "no YAML front matter"}], "warnings": []}).encode())
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            status = 409 if repo_id in hub.repos else 200
            hub.repos.setdefault(repo_id, {"refs": {}, "commits": {}, "access": payload.get("visibility", "public")})
            return self.reply(status, json.dumps({"url": f"{hub.url}/{repo_id}"}).encode())
        route = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if route is None or route.group(1) not in hub.repos:
            return self.error(404, "RepoNotFound")
        repo_id, kind, revision = route.groups()
        if kind == "preupload":
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in json.loads(body)["files"]]
            return self.reply(200, json.dumps({"files": files}).encode())
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        repo = hub.repos[repo_id]
        files = dict(repo["commits"].get(repo["refs"].get(revision), {}))
        files.update({line["value"]["path"]: base64.b64decode(line["value"]["content"])
                      for line in lines if line["key"] == "file"})
        sha = hub.add_repo(repo_id, files, revision)
        self.reply(200, json.dumps({"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha}).encode())


# --- Fixtures: a fake Hub, the client pointed at it, tiny checkpoints ------------------------------


@pytest.fixture
def hub():
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub_env(monkeypatch, tmp_path, hub):
    """``set_env(**variables)``: the environment huggingface_hub reads at import, applied by reloading its constants.

    Starts online, with no token, the cache in ``tmp_path/hf`` and ``HF_ENDPOINT`` at the fake Hub.
    """
    from huggingface_hub import constants

    def set_env(**variables):
        for name, value in variables.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        importlib.reload(constants)

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    set_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1")
    yield set_env
    monkeypatch.undo()
    importlib.reload(constants)


def tiny_checkpoint(path, seed, **config):
    """Save a tiny random model; returns its bytes."""
    mx.random.seed(seed)
    checkpoint.save(BDH(BDHConfig.from_preset("tiny", **config)), path)
    return path.read_bytes()


@pytest.fixture
def models(tmp_path):
    """Two different tiny checkpoints, as (path, bytes)."""
    paths = tmp_path / "a.npz", tmp_path / "b.npz"
    return [(p, tiny_checkpoint(p, seed)) for seed, p in enumerate(paths)]


def logits(model):
    with eval_mode(model):
        return np.array(model(mx.array([list(b"hello hub")]))[0])


MLX_LM_FILES = ["bdh_model.py", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def repo_files(model_bytes):
    return {"model.npz": model_bytes, "config.json": b"{}", "README.md": b"---\nlibrary_name: bdh-mlx\n---\n",
            "extra/large.bin": b"not needed"}


def fails_with(spec, message):
    with pytest.raises(HubError) as info:
        checkpoint.load(spec)
    assert str(info.value) == message


# --- Download ---------------------------------------------------------------------------------------


def test_load_by_repo_id_equals_local_load_and_fetches_only_the_repo_files(hub, hub_env, models, tmp_path):
    (path, data), _ = models
    hub.add_repo("org/tiny", repo_files(data))
    model = checkpoint.load("org/tiny")
    np.testing.assert_array_equal(logits(model), logits(checkpoint.load(path)))
    resolved = resolve_checkpoint("org/tiny")
    assert resolved.read_bytes() == data
    assert resolved.is_relative_to(tmp_path / "hf" / "hub" / "models--org--tiny")  # the standard cache, in HF_HOME
    fetched = {p.rsplit("/", 1)[1] for method, p in hub.requests if method == "GET" and "/resolve/" in p}
    assert fetched == {"model.npz", "config.json", "README.md"}


def test_revision_and_hub_cache_variable(hub, hub_env, models, tmp_path):
    (_, a), (path_b, b) = models
    hub.add_repo("org/tiny", repo_files(a))
    sha = hub.add_repo("org/tiny", repo_files(b), revision="v1")
    hub_env(HF_HUB_CACHE=str(tmp_path / "elsewhere"))
    assert resolve_checkpoint("org/tiny@v1").read_bytes() == b
    assert resolve_checkpoint(f"org/tiny@{sha}").read_bytes() == b
    assert resolve_checkpoint("org/tiny").read_bytes() == a
    assert resolve_checkpoint("org/tiny").is_relative_to(tmp_path / "elsewhere")
    np.testing.assert_array_equal(logits(checkpoint.load("org/tiny@v1")), logits(checkpoint.load(path_b)))
    fails_with("org/tiny@v9", "org/tiny: no revision 'v9' on the Hub")


def test_a_local_path_wins_over_a_repo_id_spelled_the_same(hub, hub_env, models, tmp_path, monkeypatch):
    (_, a), (_, b) = models
    hub.add_repo("org/tiny", repo_files(a))
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    (tmp_path / "org" / "tiny" / "model.npz").write_bytes(b)  # a folder holding model.npz, e.g. hf download --local-dir
    (tmp_path / "org" / "file").write_bytes(b)  # a file named like a repo id
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("org/tiny").read_bytes() == b
    assert resolve_checkpoint("org/file").read_bytes() == b
    assert hub.requests == []
    with pytest.raises(CheckpointError, match=r"^org/missing\.npz: no such checkpoint file$"):
        checkpoint.load("org/missing.npz")  # looks like a file: never asked of the Hub
    assert hub.requests == []


def test_offline_loads_from_a_filled_cache_and_names_the_cache_when_empty(hub, hub_env, models, tmp_path):
    (path, data), _ = models
    hub.add_repo("org/tiny", repo_files(data))
    checkpoint.load("org/tiny")
    hub_env(HF_HUB_OFFLINE="1")
    hub.repos.clear()
    before = len(hub.requests)
    np.testing.assert_array_equal(logits(checkpoint.load("org/tiny")), logits(checkpoint.load(path)))
    assert len(hub.requests) == before
    cache = tmp_path / "hf" / "hub"
    fails_with("org/other", f"org/other: not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
                            "download it once online")


def test_missing_gated_private_and_foreign_repos_are_one_line_errors(hub, hub_env, models):
    (_, data), _ = models
    hub.add_repo("org/gated", repo_files(data), access="gated")
    hub.add_repo("org/private", repo_files(data), access="private")
    hub.add_repo("org/text", {"README.md": b"---\nlicense: mit\n---\n", "weights.bin": b"x"})
    hint = "set HF_TOKEN or run `hf auth login`"
    fails_with("org/missing", f"org/missing: no such local file, and no such Hub repo (if it is private, {hint})")
    fails_with("org/private", f"org/private: no such local file, and no such Hub repo (if it is private, {hint})")
    fails_with("org/gated", f"org/gated: a gated repo; accept its conditions on the Hub, then {hint}")
    fails_with("org/text", "org/text: the Hub repo has no model.npz; it is not a bdh-mlx model")
    hub_env(HF_TOKEN=hub.token)  # the token is sent, and opens both
    assert resolve_checkpoint("org/gated").read_bytes() == data
    assert resolve_checkpoint("org/private").read_bytes() == data


def test_unreachable_hub_is_one_line(hub_env, tmp_path):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    hub_env(HF_ENDPOINT=endpoint)
    with pytest.raises(HubError) as info:
        checkpoint.load("org/tiny")
    message = str(info.value)
    assert message.startswith(f"org/tiny: cannot reach the Hub at {endpoint} (")
    assert message.endswith(f"and it is not in the Hugging Face cache ({tmp_path / 'hf' / 'hub'})")
    assert "\n" not in message


def test_not_a_repo_id_is_left_to_the_file_reader(hub, hub_env):
    for spec in ("tiny", "a/b/c", "org/na--me", "org/name@"):
        assert resolve_checkpoint(spec) == Path(spec)
    assert hub.requests == []


def test_cli_generate_with_a_repo_id(hub, hub_env, models, capsys):
    (path, data), _ = models
    hub.add_repo("org/tiny", repo_files(data))
    args = ["--prompt", "ab", "--max-tokens", "12", "--temperature", "0"]
    assert cli.main(["generate", "--model", "org/tiny", *args]) == 0
    from_hub = capsys.readouterr().out
    assert cli.main(["generate", "--checkpoint", str(path), *args]) == 0
    assert from_hub == capsys.readouterr().out
    assert len(from_hub) >= len("ab") + 1
    assert cli.main(["generate", "--model", "org/missing", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bdh-mlx generate: error: org/missing: no such local file, and no such Hub repo")
    assert err.count("\n") == 1


def test_train_init_from_a_repo_id(hub, hub_env, tmp_path, corpus_file):
    data = tiny_checkpoint(tmp_path / "wide.npz", 0, n_embd=48)
    hub.add_repo("org/wide", repo_files(data))
    out = tmp_path / "run"
    flags = [flag for flag in TINY_RUN if flag not in ("--preset", "tiny")]  # the checkpoint holds the config
    assert train.main([*flags, "--data", str(corpus_file), "--out", str(out), "--steps", "1",
                       "--init-from", "org/wide"]) == 0
    assert checkpoint.read_checkpoint(out / "last.npz")[0].n_embd == 48



def test_a_quantized_model_through_its_repo_id(hub, hub_env, tmp_path, corpus_file, capsys):
    """A 4-bit checkpoint uploaded (the mlx-lm folder), then read by repo id: every command answers as for the local
    file; training from it is refused before anything is written."""
    hub_env(HF_TOKEN=hub.token)
    local = tmp_path / "q4.npz"
    tiny_checkpoint(tmp_path / "f.npz", 3)
    assert cli.main(["quantize", "--model", str(tmp_path / "f.npz"), "--bits", "4", "--out", str(local)]) == 0
    assert cli.main(["upload", "--model", str(local), "--repo", "org/q4"]) == 0
    capsys.readouterr()
    commands = {
        "generate": ["generate", "--prompt", "ab", "--max-tokens", "12"],
        "eval": ["eval", "--data", str(corpus_file), "--block-size", "16", "--batch-size", "2", "--eval-batches", "2"],
        "inspect": ["inspect", "--text", "hello hub"],
    }
    for name, argv in commands.items():
        assert cli.main([*argv, "--model", "org/q4"]) == 0, name
        from_hub = capsys.readouterr().out.replace("org/q4", "CKPT")
        assert cli.main([*argv, "--model", str(local)]) == 0, name
        assert from_hub == capsys.readouterr().out.replace(str(local), "CKPT"), name
    out = tmp_path / "run"
    assert train.main(["--init-from", "org/q4", "--data", str(corpus_file), "--out", str(out), *TINY_RUN[2:]]) == 2
    assert "holds a quantized model (4-bit weights, for generating only)" in capsys.readouterr().err
    assert not out.exists()


# --- Upload ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real tiny run: 6 steps x grad accum 2 x batch 4 x block 32, evaluated at steps 3 and 6."""
    root = tmp_path_factory.mktemp("run")
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    train.main([*TINY_RUN, "--data", str(corpus), "--out", str(root / "run"), "--steps", "6", "--grad-accum", "2",
                "--eval-every", "3", "--log-every", "1"])
    return root / "run"


def front_matter(card):
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    return yaml.safe_load(match.group(1))


def test_upload_a_run_then_load_it_back(hub, hub_env, tiny_run, capsys):
    hub_env(HF_TOKEN=hub.token)
    ckpt = tiny_run / "best.npz"
    assert cli.main(["upload", "--checkpoint", str(ckpt), "--repo", "org/up", "--run", str(tiny_run), "--private",
                     "--dataset", "org/corpus"]) == 0
    assert capsys.readouterr().out.startswith("uploaded 10 files to org/up: ")
    repo = hub.repos["org/up"]
    files = repo["commits"][repo["refs"]["main"]]
    assert repo["access"] == "private"
    assert sorted(files) == sorted(["README.md", *MLX_LM_FILES, "plots/bpb.png", "plots/loss.png", "plots/lr.png",
                                    "plots/sparsity.png"])
    config = checkpoint.read_checkpoint(ckpt)[0]
    assert json.loads(files["config.json"])["bdh"] == config.to_dict()
    assert all(files[f"plots/{name}"].startswith(b"\x89PNG") for name in ("loss.png", "bpb.png", "sparsity.png"))

    card = files["README.md"].decode()
    meta = front_matter(card)
    assert meta["library_name"] == "bdh-mlx"
    assert meta["tags"] == ["mlx", "bdh"]
    assert meta["license"] == "mit"
    assert meta["datasets"] == ["org/corpus"]
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val_loss" in r][-1]
    assert final["step"] == 6
    assert "| steps | 6 |" in card
    assert f"| tokens seen | {6 * 2 * 4 * 32:,} (steps 6 x grad accum 2 x batch 4 x block 32 bytes) |" in card
    assert f"| {config.num_parameters:,} | 2 | 2 | 32 | 128 | 256 bytes |" in card
    assert f"| final validation loss | {final['val_loss']:.4f} nats (step 6) |" in card
    assert f"| final bits per byte | {final['val_loss'] / math.log(2):.4f} |" in card
    for layer, (x, y) in enumerate(zip(final["sparsity_x"], final["sparsity_y"], strict=True)):
        assert f"| {layer} | {x:.3f} | {y:.3f} |" in card
    assert "![loss](plots/loss.png)" in card and "![sparsity](plots/sparsity.png)" in card
    assert 'model = load("org/up")' in card and "bdh-mlx generate --model org/up" in card

    hub_env(HF_TOKEN=None)  # a private repo: reading it back needs the token too
    fails_with("org/up", "org/up: no such local file, and no such Hub repo (if it is private, set HF_TOKEN or run "
                         "`hf auth login`)")
    hub_env(HF_TOKEN=hub.token)
    np.testing.assert_array_equal(logits(checkpoint.load("org/up")), logits(checkpoint.load(ckpt)))


def test_upload_dry_run_without_a_run(tmp_path, models, capsys):
    (path, data), _ = models
    out = tmp_path / "folder"
    assert cli.main(["upload", "--checkpoint", str(path), "--repo", "org/bare", "--license", "apache-2.0",
                     "--dry-run", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", *MLX_LM_FILES]
    (config, weights), (want_config, want) = checkpoint.read_checkpoint(out), checkpoint.read_checkpoint(path)
    assert config == want_config and all(np.array_equal(weights[k], want[k]) for k in want) and data
    card = (out / "README.md").read_text()
    assert front_matter(card) == {"library_name": "bdh-mlx", "license": "apache-2.0", "tags": ["mlx", "bdh"],
                                  "pipeline_tag": "text-generation"}
    assert "## Training" not in card


def test_upload_errors_are_one_line(hub, hub_env, models, tmp_path, capsys):
    (path, _), _ = models
    assert cli.main(["upload", "--checkpoint", str(path), "--repo", "org/up"]) == 2  # no token
    assert capsys.readouterr().err == ("bdh-mlx upload: error: org/up: the Hub refused access (401); "
                                       "set HF_TOKEN or run `hf auth login`\n")
    assert "org/up" not in hub.repos
    assert cli.main(["upload", "--checkpoint", str(path), "--repo", "not a repo"]) == 2
    assert "'not a repo' is not a Hub repo id (org/name)" in capsys.readouterr().err
    assert cli.main(["upload", "--checkpoint", str(path), "--repo", "org/up", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"bdh-mlx upload: error: {tmp_path}: no metrics.jsonl (is it a bdh-mlx run folder?)\n"


@pytest.mark.parametrize("template", [None, {"prompt": "Q: {instruction}\nA: ", "prompt_input": "{input}\nQ: "
                                              "{instruction}\nA: ", "end": "<|end|>"}])
def test_model_card_usage_runs(tmp_path, template, capsys):
    """The card's shell and Python usage fit the model (plain text, or instructions for a fine-tuned one),
    and its Python block runs as written against the checkpoint."""
    from bdh_mlx.storage.upload import model_card

    mx.random.seed(0)
    config = BDHConfig.from_preset("tiny", prompt_template=template)
    path = tmp_path / "model.npz"
    checkpoint.save(BDH(config), path)
    card = model_card("org/name", config, "mit", [])
    if template is None:
        assert '--prompt "The "' in card and "--instruction" not in card
    else:
        assert '--instruction "Name three colours."' in card and "bdh-mlx chat --model org/name" in card
        assert "`<|end|>`" in card and "--prompt" not in card
    python = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace('"org/name"', repr(str(path)))
    exec(python, {})
    printed = capsys.readouterr().out
    assert printed.endswith("\n") and len(printed) > 1
