# Shared by the launch scripts (sourced, not run): which interpreter, and a free local port.
# shellcheck shell=bash

# find_python REPO: sets PYTHON (kept when already set) to $VIRTUAL_ENV's python, else REPO/.venv's, else python3.
find_python() {
    if [ -n "${PYTHON:-}" ]; then return; fi
    if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PYTHON="$VIRTUAL_ENV/bin/python"
    elif [ -x "$1/.venv/bin/python" ]; then PYTHON="$1/.venv/bin/python"
    else PYTHON=python3; fi
}

# free_port: a port nothing listens on now (one host: two local jobs, or a rendezvous left on 29500, cannot collide).
free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
