"""Test probe, not project code: on PYTHONPATH (with BIOBERT_PROBE_DIR set) every Python process that runs
pretraining/run.py or data_prep/run.py records where it ran and the launch-relevant environment it was given.

A rank on another node only writes a record if PYTHONPATH and BIOBERT_PROBE_DIR reached it, and the record shows which
of the other forwarded variables did; tests compare it with what the submitting shell set.
"""

import json
import os
import socket


def _record() -> None:
    out = os.environ.get("BIOBERT_PROBE_DIR")
    if not out:
        return
    try:
        with open("/proc/self/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return
    if "pretraining/run.py" not in cmd and "data_prep/run.py" not in cmd:
        return
    keep = ("NCCL_", "BIOBERT_", "OMP_", "MASTER_", "RANK", "LOCAL_RANK", "SLURM_PROCID", "SLURM_LOCALID",
            "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k.startswith(keep) or k in ("LD_LIBRARY_PATH", "PYTHONPATH")}
    rec = {"host": socket.gethostname(), "pid": os.getpid(), "cmd": cmd[:400], "env": env}
    path = os.path.join(out, f"{socket.gethostname()}-{os.getpid()}.json")
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(rec, f)
        os.replace(path + ".tmp", path)
    except OSError:
        pass


_record()
