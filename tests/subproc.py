"""Run a launcher (deepspeed, mpirun, bash scripts) so that a timeout kills every process it started.

subprocess.run(timeout=...) kills only the direct child: a deepspeed launcher's ranks would live on, holding ports,
CPU and lock files, and slow or hang every test after it.
"""

from __future__ import annotations

import os
import signal
import subprocess


def run_group(cmd: list[str], *, timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """Like subprocess.run(cmd, capture_output=True, text=True, timeout=timeout), in a new session; on timeout the
    whole process group is SIGKILLed before TimeoutExpired is raised (with the output so far)."""
    popen_kwargs.setdefault("stdout", subprocess.PIPE)
    popen_kwargs.setdefault("stderr", subprocess.PIPE)
    popen_kwargs.setdefault("text", True)
    with subprocess.Popen(cmd, start_new_session=True, **popen_kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
        finally:
            if proc.poll() is None:
                kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
