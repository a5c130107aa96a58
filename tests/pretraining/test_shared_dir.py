"""pretraining/shared_dir.py and the checkpoint's gathered views, with 2 real gloo ranks on this host: rank 1 is handed
another directory than rank 0, as a node with node-local storage at the same path would see. (The same on two Slurm
nodes with a per-node mount: tests/launch/test_multinode.py.)"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from biobert.files import free_port

pytestmark = pytest.mark.slow


def _rank(rank: int, port: int, base: str, results) -> None:
    import torch.distributed as td

    from pretraining import checkpoint as ckpt
    from pretraining import shared_dir

    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out = {}
    try:
        shared_dir.check(Path(base) / "shared")  # the same directory for both: passes
        out["shared"] = sorted(p.name for p in (Path(base) / "shared").iterdir())  # token removed afterwards
        try:  # rank 1 on "its own node": an empty directory of its own at what should be the shared path
            shared_dir.check(Path(base) / ("own0" if rank == 0 else "own1"))
        except shared_dir.SharedDirError as e:
            out["split"] = str(e)
        # a checkpoint complete for rank 0 that rank 1 cannot see: both stop before DeepSpeed's collective load
        folder = Path(base) / ("ckpt" if rank == 0 else "elsewhere") / "step_00000004"
        try:
            ckpt.load(None, folder)
        except shared_dir.SharedDirError as e:
            out["load"] = str(e)
    finally:
        td.destroy_process_group()
    results[rank] = out


def test_every_rank_names_the_rank_that_does_not_see_the_directory(tmp_path):
    from pretraining import checkpoint as ckpt

    folder = tmp_path / "ckpt" / "step_00000004"
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    ckpt.mark_complete(folder, step=4, world_size=2, zero_stage=2)
    (tmp_path / "own1").mkdir()
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(free_port(), str(tmp_path), results), nprocs=2, join=True)
    host = socket.gethostname()
    for rank in (0, 1):
        r = results[rank]
        assert r["shared"] == []
        assert f"is not the same directory on every node: rank 0 (node {host}) wrote .shared-check-" in r["split"]
        assert f"but node {host} (rank 1): .shared-check-" in r["split"] and "does not exist there" in r["split"]
        assert f"it is complete for rank 0 but not as seen from node {host} (rank 1): " \
               f"{tmp_path}/elsewhere/step_00000004: no COMPLETE.json" in r["load"]
