"""`mpirun -n 2 python data_prep/run.py ...` writes the same bytes as one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mpi_two_ranks_equal_one_process(demo_corpus, minilm_dir, tmp_path):
    mpirun = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")
    if not Path(mpirun).exists():
        pytest.skip("mpirun not installed (pip install '.[mpi]')")
    pytest.importorskip("mpi4py")
    inputs = []
    for i in range(3):  # three files -> three work groups split over the ranks
        p = tmp_path / f"part{i}.txt"
        p.write_text("\n\n".join(demo_corpus.read_text(encoding="utf-8").split("\n\n")[i::3]), encoding="utf-8")
        inputs.append(str(p))
    args = [*inputs, "--vocab", str(minilm_dir), "--num-shards", "3", "--dupe-factor", "2", "--no-progress",
            "--group-mb", "0.000001"]
    script = str(REPO / "data_prep" / "run.py")
    env = {**os.environ, "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    subprocess.run([sys.executable, script, *args, "--output-dir", str(tmp_path / "one")], check=True, env=env,
                   timeout=120)
    r = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, script, *args,
                        "--output-dir", str(tmp_path / "two")], env=env, timeout=180, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("data_prep:") == 1  # one summary line, from rank 0
    one = sorted((tmp_path / "one").rglob("shard-*.hdf5"))  # training shards and the validation split's
    two = sorted((tmp_path / "two").rglob("shard-*.hdf5"))
    assert [p.relative_to(tmp_path / "one") for p in one] == [p.relative_to(tmp_path / "two") for p in two]
    assert len(one) == 4 and one[-1].parent.name == "validation"  # the forced held-out document was redone by a rank
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))
    assert (tmp_path / "one" / "manifest.json").read_text() == (tmp_path / "two" / "manifest.json").read_text().replace(
        str(tmp_path / "two"), str(tmp_path / "one"))
