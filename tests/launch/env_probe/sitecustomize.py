"""Test probe, not project code: on PYTHONPATH (with BIOBERT_PROBE_DIR set) every Python process that runs
pretraining or data prep -- `-m pretraining.run`, `-m data_prep.run`, `-m biobert pretrain|prep`, the `biobert`
command, or the scripts by path -- records where it ran and the launch-relevant environment it was given.
Launchers (`-m deepspeed.launcher.*`, `-m biobert plan`, mpirun's helpers) run something else and write nothing.

A rank on another node only writes a record if PYTHONPATH and BIOBERT_PROBE_DIR reached it, and the record shows which
of the other forwarded variables did; tests compare it with what the submitting shell set.
"""

import json
import os
import socket

MODULES = ("pretraining.run", "data_prep.run")
SUBCOMMANDS = ("pretrain", "prep")  # `biobert <sub>` runs one of MODULES
SCRIPTS = ("pretraining/run.py", "data_prep/run.py")
_WITH_VALUE = ("-W", "-X", "-Q")  # interpreter options that take the next argument


def _is_rank(argv: list[str]) -> bool:
    """Does this interpreter command line run pretraining or data prep (not a launcher of them)?"""
    if argv and os.path.basename(argv[0]) == "biobert":  # the console script: biobert <sub> ...
        return len(argv) > 1 and argv[1] in SUBCOMMANDS
    i = 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-m":
        i += 2 if argv[i] in _WITH_VALUE else 1
    if i + 1 < len(argv) and argv[i] == "-m":
        module, rest = argv[i + 1], argv[i + 2:]
        return module in MODULES or (module == "biobert" and bool(rest) and rest[0] in SUBCOMMANDS)
    if i < len(argv):
        script = argv[i]
        if os.path.basename(script) == "biobert":
            return i + 1 < len(argv) and argv[i + 1] in SUBCOMMANDS
        return script.endswith(SCRIPTS)
    return False


def _record() -> None:
    out = os.environ.get("BIOBERT_PROBE_DIR")
    if not out:
        return
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return
    if not _is_rank(argv):
        return
    keep = ("NCCL_", "BIOBERT_", "OMP_", "MASTER_", "RANK", "LOCAL_RANK", "SLURM_PROCID", "SLURM_LOCALID",
            "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k.startswith(keep) or k in ("LD_LIBRARY_PATH", "PYTHONPATH")}
    rec = {"host": socket.gethostname(), "pid": os.getpid(), "cmd": " ".join(argv)[:400], "env": env}
    path = os.path.join(out, f"{socket.gethostname()}-{os.getpid()}.json")
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(rec, f)
        os.replace(path + ".tmp", path)
    except OSError:
        pass


_record()
