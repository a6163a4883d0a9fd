"""Every Hub call ends in bounded time with one line and exit 2: against a Hub that accepts connections and never
answers, one that answers random bytes with HTTP 200, and a port nobody listens on (all on 127.0.0.1)."""

import http.server
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import TINY_RUN

from bdh_mlx import BDH, BDHConfig
from bdh_mlx.storage import checkpoint

# Short waits, so that each case takes seconds: one request waits 1 s for a byte, a call gives up after 2 s
# without an answer (the defaults are 10 s and 30 s).
SHORT_WAITS = {"HF_HUB_DOWNLOAD_TIMEOUT": "1", "HF_HUB_ETAG_TIMEOUT": "1", "BDH_HUB_TIMEOUT": "2"}
HANG = 60  # a command still running after this long hangs


class SilentServer:
    """Accepts every connection and never answers."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                self.connections.append(self.socket.accept()[0])
            except OSError:  # closed
                return

    def close(self):
        self.socket.close()
        for connection in self.connections:
            connection.close()


class JunkHandler(http.server.BaseHTTPRequestHandler):
    """HTTP 200 with random bytes, to every request."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = random.Random(self.path).randbytes(512)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.do_GET()

    do_PUT = do_POST


class JunkServer(http.server.ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), JunkHandler)
        self.url = f"http://127.0.0.1:{self.server_port}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()


def refused_url() -> str:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{closed.getsockname()[1]}"


@pytest.fixture(params=["silent", "junk", "refused"])
def endpoint(request):
    """The URL of a broken Hub; its server is stopped after the test."""
    if request.param == "refused":
        yield refused_url()
        return
    server = SilentServer() if request.param == "silent" else JunkServer()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.npz"
    checkpoint.save(BDH(BDHConfig.from_preset("tiny")), path)
    return path


def run_against(endpoint, argv, tmp_path, **env):
    """``bdh-mlx argv`` with the Hub at ``endpoint``: (exit code, stderr lines, seconds)."""
    environ = {**os.environ, **SHORT_WAITS, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_TOKEN": "hf_test_token", **env}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "bdh_mlx", *argv], capture_output=True, text=True, env=environ,
                          timeout=HANG, cwd=tmp_path)
    return done.returncode, done.stderr.splitlines(), time.monotonic() - start


COMMANDS = {
    "generate": (["generate", "--model", "org/tiny", "--prompt", "a"], "org/tiny: "),
    "upload": (["upload", "--checkpoint", "{tiny}", "--repo", "org/up"], "org/up: "),
    "train": (["train", *TINY_RUN, "--dataset", "org/text", "--out", "run", "--steps", "1"], "org/text: "),
    "finetune": (["finetune", *TINY_RUN[2:], "--init-from", "{tiny}", "--data", "org/pairs", "--out", "ft",
                  "--steps", "1"], "org/pairs: "),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_broken_hub_is_one_line_and_exit_2_in_bounded_time(endpoint, command, tiny, tmp_path):
    argv, names = COMMANDS[command]
    code, err, seconds = run_against(endpoint, [a.format(tiny=tiny) for a in argv], tmp_path)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"bdh-mlx {command}: error: {names}")
    assert seconds < HANG / 2
    assert not (tmp_path / "run").exists() and not (tmp_path / "ft").exists()


def test_the_silent_hub_is_named_with_the_setting_that_bounds_the_wait(tmp_path):
    server = SilentServer()
    try:
        code, err, _ = run_against(server.url, ["train", *TINY_RUN, "--dataset", "org/text", "--out", "run"], tmp_path)
    finally:
        server.close()
    assert code == 2
    assert err == [f"bdh-mlx train: error: org/text: cannot load the dataset: no answer from {server.url} for 2 s "
                   f"(BDH_HUB_TIMEOUT)"]


def test_a_bad_timeout_setting_is_one_line(tmp_path, tiny):
    code, err, _ = run_against(refused_url(), ["generate", "--model", "org/tiny", "--prompt", "a"], tmp_path,
                               BDH_HUB_TIMEOUT="soon")
    assert code == 2
    assert err == ["bdh-mlx generate: error: BDH_HUB_TIMEOUT must be a positive number of seconds, got 'soon'"]


def test_the_bound_acts_inside_bdh_mlx_calls_only(monkeypatch):
    """A Hub silent for BDH_HUB_TIMEOUT stops a call inside ``bounded_network``; huggingface_hub used directly,
    afterwards, is left as it is."""
    from huggingface_hub import constants, get_session

    from bdh_mlx.storage.hub import HubSilent, bounded_network

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("BDH_HUB_TIMEOUT", "0.05")
    server = JunkServer()
    try:
        with bounded_network():
            time.sleep(0.1)
            with pytest.raises(HubSilent, match=rf"^no answer from {server.url} for 0.05 s \(BDH_HUB_TIMEOUT\)$"):
                get_session().get(server.url)
        time.sleep(0.1)
        assert get_session().get(server.url).status_code == 200
    finally:
        server.close()
