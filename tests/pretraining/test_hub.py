"""resolve_model_dir: packaged model, local dirs, and real downloads from a local HTTP server (atomic, verified)."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import threading
from functools import partial
from pathlib import Path

import pytest

from pretraining import hub
from pretraining.hub import resolve_model_dir


class Handler(http.server.SimpleHTTPRequestHandler):
    mode = "ok"  # "ok" | "bad_sha" | "truncate"
    requests: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        if path.suffix == ".safetensors":  # HF serves the sha256 of LFS files as ETag
            sha = hashlib.sha256(data if self.mode != "bad_sha" else b"other").hexdigest()
            self.send_header("ETag", f'"{sha}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.mode == "truncate" and path.suffix == ".safetensors":
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        self.wfile.write(data)


@pytest.fixture
def server(tmp_path, minilm_dir, monkeypatch):
    root = tmp_path / "www" / "models" / "minilm"
    root.mkdir(parents=True)
    for name in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, root / name)
    (root / "model.safetensors").symlink_to(minilm_dir / "model.safetensors")  # 90 MB: served, not copied
    monkeypatch.setenv("BIOBERT_CACHE", str(tmp_path / "cache"))
    Handler.mode, Handler.requests = "ok", []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(tmp_path / "www")))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/models/minilm", root, tmp_path / "cache"
    httpd.shutdown()
    httpd.server_close()


def test_named_and_local(minilm_dir, tmp_path):
    assert resolve_model_dir("minilm") == minilm_dir == resolve_model_dir("default")
    assert resolve_model_dir(str(minilm_dir)) == minilm_dir
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"half: not a usable model directory, missing model.safetensors"):
        resolve_model_dir(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="not an existing directory"):
        resolve_model_dir(tmp_path / "nope")


def test_download_is_complete_verified_and_cached(server, minilm_dir):
    url, root, cache = server
    got = resolve_model_dir(url + "/")
    assert got.parent == cache and got == hub.cache_dir_for(url)
    for name in ("config.json", "vocab.txt", "tokenizer.json", "model.safetensors"):
        assert (got / name).read_bytes() == (minilm_dir / name).read_bytes()
    assert not (got / "special_tokens_map.json").exists()  # optional file the server lacks (404): skipped
    assert not (got / "pytorch_model.bin").exists()  # safetensors found first: .bin never requested
    assert not any("pytorch_model.bin" in r for r in Handler.requests)
    assert [p.name for p in cache.iterdir()] == [got.name]  # no temp dir left

    from pretraining.model import BertModel, load_pretrained

    assert load_pretrained(got, BertModel).config.hidden_size == 384

    Handler.requests = []
    assert resolve_model_dir(url) == got and Handler.requests == []  # cached: no network


@pytest.mark.parametrize("mode,match", [("bad_sha", "sha256 .* does not match"), ("truncate", "incomplete download")])
def test_corrupt_or_partial_download_never_looks_complete(server, mode, match):
    url, root, cache = server
    Handler.mode = mode
    with pytest.raises(OSError, match=match):
        resolve_model_dir(url)
    assert not hub.cache_dir_for(url).exists()
    assert list(cache.iterdir()) == []  # temp dir cleaned up
    Handler.mode = "ok"  # the next attempt starts afresh and succeeds
    assert (resolve_model_dir(url) / "model.safetensors").is_file()


def test_missing_required_files_named(server):
    url, root, cache = server
    (root / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"minilm/vocab.txt: not found \(HTTP 404\)"):
        resolve_model_dir(url)
    shutil.copy(hub.packaged_model_dir() / "vocab.txt", root / "vocab.txt")
    (root / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights, tried model.safetensors and pytorch_model.bin"):
        resolve_model_dir(url)
    assert list(cache.iterdir()) == []


def test_cache_dir_naming(monkeypatch, tmp_path):
    monkeypatch.setenv("BIOBERT_CACHE", str(tmp_path))
    a = hub.cache_dir_for("https://huggingface.co/dmis-lab/biobert-v1.1")
    assert a == hub.cache_dir_for("https://huggingface.co/dmis-lab/biobert-v1.1/")  # trailing slash: same entry
    assert a.parent == tmp_path and "biobert-v1.1" in a.name
    assert hub._base_url("https://huggingface.co/dmis-lab/biobert-v1.1") == \
        "https://huggingface.co/dmis-lab/biobert-v1.1/resolve/main"
    assert hub._base_url("http://host/models/x/") == "http://host/models/x"
    assert a != hub.cache_dir_for("https://huggingface.co/dmis-lab/biobert-base-cased-v1.2")


HUB_ID = "dmis-lab/biobert-base-cased-v1.2"
COMMIT = "a" * 40


def hub_cache(root: Path, minilm_dir: Path, weights: str = "model.safetensors") -> Path:
    """A huggingface_hub cache laid out as the library writes it: refs/main -> snapshots/<commit>/files."""
    repo = root / "models--dmis-lab--biobert-base-cased-v1.2"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, snap / name)
    (snap / weights).symlink_to(minilm_dir / "model.safetensors")
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: offline resolution must not touch the network."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hub_id_resolves_from_the_local_cache_offline(tmp_path, minilm_dir, monkeypatch, no_network):
    cache = hub_cache(tmp_path / "hub", minilm_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = resolve_model_dir(HUB_ID)
    assert got == cache / "models--dmis-lab--biobert-base-cased-v1.2" / "snapshots" / COMMIT
    assert (got / "model.safetensors").is_file() and (got / "vocab.txt").is_file()
    from finetuning.heads import resolve_model  # fine-tuning takes hub ids the same way

    assert resolve_model(HUB_ID) == got
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # HF_HOME/hub is the cache too
    assert resolve_model_dir(HUB_ID) == got


def test_hub_id_with_pytorch_bin_only(tmp_path, minilm_dir, monkeypatch, no_network):
    cache = hub_cache(tmp_path / "hub", minilm_dir, weights="pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (resolve_model_dir(HUB_ID) / "pytorch_model.bin").exists()


def test_uncached_hub_id_offline_is_one_line_error(tmp_path, monkeypatch, no_network):
    from biobert.errors import run

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"dmis-lab/biobert-base-cased-v1.2.*no hub reachable \(HF_HUB_OFFLINE=1\)"
                                                r".*huggingface-cli download"):
        resolve_model_dir(HUB_ID)
    assert hub.is_hub_id(HUB_ID) and not hub.is_hub_id("minilm") and not hub.is_hub_id("/abs/path/x")

    def cli(argv):
        resolve_model_dir(argv[0])

    assert run(cli, [HUB_ID]) == 2


def test_hub_id_offline_in_a_fresh_process(tmp_path, minilm_dir):
    """HF_HUB_OFFLINE and HF_HUB_CACHE set before huggingface_hub is imported, as a user sets them."""
    import os
    import subprocess
    import sys

    cache = hub_cache(tmp_path / "hub", minilm_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "NO_PROXY": "*",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # any request would fail
    code = "from pretraining.hub import resolve_model_dir as r; print(r('dmis-lab/biobert-base-cased-v1.2'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith(f"snapshots/{COMMIT}")
