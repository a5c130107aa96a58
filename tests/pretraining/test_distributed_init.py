"""DeepSpeed init must not hang on a lock file left by a killed JIT build (what stalled every later launch in CI)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from engine_fixtures import REPO, clean_env

INIT = "from biobert import dist as d; e = d.init(); import torch; print('ok', e.world_size, " \
       "torch.distributed.get_world_size())"


def test_init_survives_a_stale_extension_lock(tmp_path):
    ext = tmp_path / "torch_extensions"
    lock = ext / "deepspeed_shm_comm" / "lock"  # where DeepSpeed's CPU shm op takes its build lock
    lock.parent.mkdir(parents=True)
    lock.touch()
    hour_ago = time.time() - 3600
    os.utime(lock, (hour_ago, hour_ago))
    env = {**clean_env(), "TORCH_EXTENSIONS_DIR": str(ext)}
    # before the fix this waited on the lock forever: the timeout is the failure
    r = subprocess.run([sys.executable, "-c", INIT], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok 1 1" in r.stdout
    assert f"{lock} is 60 min old" in r.stdout  # the warning names the file
    assert lock.exists()  # a lock is never removed for the user: another build may own it


def test_fresh_lock_is_not_reported(tmp_path, monkeypatch):
    from biobert.dist import warn_stale_extension_locks

    (tmp_path / "op").mkdir()
    (tmp_path / "op" / "lock").touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert warn_stale_extension_locks() == []
    assert warn_stale_extension_locks(max_age_s=-1) == [str(tmp_path / "op" / "lock")]
