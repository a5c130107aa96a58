# Shared by the launch scripts (sourced, not run): which interpreter. The launch rules (ports, hosts, device) come
# from `biobert plan --shell`, not from here.
# shellcheck shell=bash

# find_python REPO: sets PYTHON (kept when already set) to $VIRTUAL_ENV's python, else REPO/.venv's, else python3.
find_python() {
    if [ -n "${PYTHON:-}" ]; then return; fi
    if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PYTHON="$VIRTUAL_ENV/bin/python"
    elif [ -x "$1/.venv/bin/python" ]; then PYTHON="$1/.venv/bin/python"
    else PYTHON=python3; fi
}
