"""storage/pretrained.py through sample.py: released weights by name from a local HTTP server (never the internet)."""
import glob
import hashlib
import http.server
import io
import json
import os
import re
import socket
import threading

import pytest
import torch

import sample
import sample_ddp
from command_line import run_cli
from models import create_model
from storage import pretrained
from storage.pretrained import PRETRAINED, PretrainedFile

# A pixel-space ADM small enough to sample on CPU in a second, standing in for a released file.
TINY_ADM = dict(model_channels=32, channel_mult=1, num_res_blocks=1, attention_resolutions=8, num_head_channels=32)
TINY_ARGS = [a for key, value in TINY_ADM.items() for a in ("--model-arg", f"{key}={value}")]
NAME = "tiny-adm-8x8.pt"


class Server(http.server.ThreadingHTTPServer):
    """Serves /good/NAME (the file), /corrupt/NAME (other bytes), /drop/NAME (half, then the connection closes),
    anything else 404; counts requests."""

    def __init__(self, payload):
        super().__init__(("127.0.0.1", 0), Handler)
        self.payload, self.requests = payload, 0

    def url(self, kind):
        return f"http://127.0.0.1:{self.server_address[1]}/{kind}"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests += 1
        kind, payload = self.path.split("/")[1], self.server.payload
        if kind not in ("good", "corrupt", "drop"):
            self.send_error(404)
            return
        body = payload if kind != "corrupt" else bytes(b ^ 0xFF for b in payload[:4096]) + payload[4096:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if kind == "drop" else body)
        if kind == "drop":
            self.close_connection = True

    def log_message(self, *args):  # keep the test output quiet
        pass


def closed_port_url():
    """A URL on 127.0.0.1 where nobody listens (a port just freed): what an offline machine answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def no_proxy_for_the_local_server(monkeypatch):
    """A CI machine's http_proxy must not route 127.0.0.1 away (urllib honours no_proxy)."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    model = create_model("ADM-FFHQ64", input_size=8, **TINY_ADM)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    server = Server(buffer.getvalue())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def released(monkeypatch, server):
    """NAME in the table of released files, with the SHA-256 of the server's good file."""
    entry = PretrainedFile(server.url("good") + "/" + NAME, hashlib.sha256(server.payload).hexdigest(), "ADM-FFHQ64", 8)
    monkeypatch.setitem(PRETRAINED, NAME, entry)
    monkeypatch.delenv(pretrained.MIRROR_ENV, raising=False)
    return entry


def draw(tmp_path, *flags):
    argv = ["--num-sampling-steps", "2", "--samples-per-class", "1", "--out", tmp_path / "grid.png", *TINY_ARGS, *flags]
    return run_cli(sample.main, sample.build_parser(), argv, "sample.py")


def test_a_released_name_is_downloaded_once_checked_and_sampled(tmp_path, server, released):
    cache = tmp_path / "cache"
    before = server.requests
    code, stderr = draw(tmp_path, "--ckpt", NAME, "--pretrained-dir", cache)
    assert code == 0 and "error" not in stderr, stderr
    assert os.listdir(cache) == [NAME]  # no temp file beside it
    assert (cache / NAME).read_bytes() == server.payload and os.path.isfile(tmp_path / "grid.png")
    os.remove(tmp_path / "grid.png")
    code, _ = draw(tmp_path, "--ckpt", NAME, "--pretrained-dir", cache)  # the second run reads the cache
    assert code == 0 and server.requests == before + 1 and os.path.isfile(tmp_path / "grid.png")
    code, _ = run_cli(sample_ddp.main, sample_ddp.build_parser(), [
        "--ckpt", NAME, "--pretrained-dir", cache, "--sample-dir", tmp_path / "samples", "--num-fid-samples", 1,
        "--num-sampling-steps", 2, *TINY_ARGS], "sample_ddp.py")
    [config] = glob.glob(str(tmp_path / "samples" / "*.shards" / "config.json"))
    with open(config) as f:  # the samples record the cached file they came from
        assert code == 0 and json.load(f)["ckpt"] == str(cache / NAME) and server.requests == before + 1


@pytest.mark.parametrize("kind, reason", [
    ("corrupt", "the file's SHA-256 is [0-9a-f]{64}, not the released [0-9a-f]{64}"),
    ("drop", "the connection broke off"),
    ("missing", "HTTP 404"),
    ("offline", "Connection refused"),
])
def test_a_failed_download_is_one_line_and_leaves_nothing(tmp_path, server, released, kind, reason):
    mirror = closed_port_url() if kind == "offline" else server.url(kind)
    cache = tmp_path / "cache"
    code, stderr = draw(tmp_path, "--ckpt", NAME, "--pretrained-dir", cache, "--pretrained-url", mirror)
    assert code == 2 and len(stderr.splitlines()) == 1
    assert stderr.startswith(f"sample.py: error: cannot download {NAME} from {mirror}/{NAME}: ")
    assert re.search(reason, stderr)
    assert stderr.endswith(f"nothing was kept. Download {released.url} to {cache / NAME} yourself (or give its path "
                           f"with --ckpt), or name a mirror with --pretrained-url / DTR_PRETRAINED_URL\n")
    assert not os.path.exists(cache) and os.listdir(tmp_path) == []  # no folder, no temp file, no grid


def test_without_a_published_hash_the_file_is_checked_for_format_and_its_hash_printed(tmp_path, server, released,
                                                                                      monkeypatch):
    monkeypatch.setitem(PRETRAINED, NAME, PretrainedFile(released.url, None, "ADM-FFHQ64", 8))
    monkeypatch.setenv(pretrained.MIRROR_ENV, server.url("good"))  # the mirror by environment variable
    code, stderr = draw(tmp_path, "--ckpt", NAME, "--pretrained-dir", tmp_path / "cache")
    assert code == 0
    assert f"{tmp_path / 'cache' / NAME}: SHA-256 {hashlib.sha256(server.payload).hexdigest()} (its authors" in stderr
    # no hash to catch the corrupt file: but half a file is not a whole torch.save archive
    monkeypatch.setenv(pretrained.MIRROR_ENV, server.url("drop"))
    code, stderr = draw(tmp_path, "--ckpt", NAME, "--pretrained-dir", tmp_path / "other")
    assert code == 2 and "the connection broke off after" in stderr and not os.path.exists(tmp_path / "other")


def test_official_names_and_defaults_map_to_the_released_files(tmp_path, monkeypatch):
    offline = closed_port_url()
    monkeypatch.setenv(pretrained.MIRROR_ENV, offline)  # never the internet
    cache = tmp_path / "cache"
    for flags, name in ((["--model", "DiT-XL/2", "--image-size", "512"], "DiT-XL-2-512x512.pt"),
                        ([], "DiT-XL-2-256x256.pt"),  # official DiT's sample.py with no flags
                        (["--ckpt", "64x64_diffusion.pt"], "64x64_diffusion.pt"),
                        (["--model", "ADM-ImageNet64"], "64x64_diffusion.pt")):  # released at one size only
        code, stderr = run_cli(sample.main, sample.build_parser(), [*flags, "--pretrained-dir", cache,
                                                                    "--out", tmp_path / "x.png"], "sample.py")
        assert code == 2 and f"cannot download {name} from {offline}/{name}" in stderr
        assert f"Download {PRETRAINED[name].url} to {cache / name} yourself" in stderr
    for flags, message in (
            (["--model", "DiT-S/2"], "--ckpt is required: no released weights of --model DiT-S/2 (released: "
                                     "DiT-XL/2 at 256 px, DiT-XL/2 at 512 px, ADM-ImageNet64 at 64 px)"),
            (["--image-size", "128"], "--ckpt is required: no released weights of --model DiT-XL/2 at 128 px "
                                      "(released: DiT-XL/2 at 256 px, DiT-XL/2 at 512 px, ADM-ImageNet64 at 64 px)"),
            (["--ckpt", "DiT-XL-2-512x512.pt", "--image-size", "256"],
             "--image-size 256 does not fit DiT-XL-2-512x512.pt, the released DiT-XL/2 at 512 px")):
        code, stderr = run_cli(sample.main, sample.build_parser(), [*flags, "--out", tmp_path / "x.png"], "sample.py")
        assert (code, stderr) == (2, f"sample.py: error: {message}\n")
    assert os.listdir(tmp_path) == []
