#!/usr/bin/env bash
# Pretraining on this machine: N GPUs, or N CPU ranks, through the deepspeed launcher.
#
#   launch/local.sh [key=value overrides for pretraining/run.py]
#   NPROC=8 CONFIG=pretraining/configs/biobert_continued_seq512.yaml launch/local.sh max_steps=1000
#   DEVICE=cpu NPROC=2 CONFIG=pretraining/configs/tiny_cpu.yaml launch/local.sh data.shard_dir=demo_out/shards
#
# Settings (environment variables):
#   CONFIG      run config          (default pretraining/configs/biobert_continued_seq512.yaml)
#   DS_CONFIG   DeepSpeed config    (default: the run config's deepspeed_config)
#   DEVICE      auto | cuda | cpu   (auto: cuda when nvidia-smi sees a GPU; cpu sets DS_ACCELERATOR=cpu)
#   NPROC       ranks               (default: every GPU; on CPU 2)
#   MASTER_PORT rendezvous port     (default: a free one)
#   PYTHON      interpreter         (default: $VIRTUAL_ENV, else the repo's .venv, else python3)
# Exit code: the engine's (0 finished, 75 stopped by SIGTERM/SIGUSR1 after a checkpoint: run again to resume).
# Signals: SIGTERM/SIGINT/SIGUSR1 to this script reach the training ranks (they checkpoint and exit 75); the
# deepspeed launcher itself ignores SIGUSR1, so only the ranks act on it.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
# shellcheck source=launch/lib.sh
. "$REPO/launch/lib.sh"
find_python "$REPO"

DEVICE=${DEVICE:-auto}
if [ "$DEVICE" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then DEVICE=cuda
    else DEVICE=cpu; fi
fi
case "$DEVICE" in
    cpu) export DS_ACCELERATOR=cpu; NPROC=${NPROC:-2}; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ;;
    cuda|gpu) NPROC=${NPROC:-$(nvidia-smi -L | grep -c '^GPU ')} ;;
    *) echo "DEVICE=$DEVICE: expected auto, cuda or cpu" >&2; exit 2 ;;
esac
MASTER_PORT=${MASTER_PORT:-$(free_port)}
CONFIG=${CONFIG:-pretraining/configs/biobert_continued_seq512.yaml}
args=(--config "$CONFIG")
[ -n "${DS_CONFIG:-}" ] && args+=(--deepspeed_config "$DS_CONFIG")

echo "launch/local.sh: $NPROC ranks on $DEVICE, master 127.0.0.1:$MASTER_PORT, config $CONFIG" >&2
# The launcher runs in the background so this shell can pass signals to the ranks (the launcher would turn a
# SIGTERM into "kill the ranks and exit 1", losing the engine's exit code 75).
(trap '' USR1; exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$MASTER_PORT" \
    pretraining/run.py "${args[@]}" "$@") &
launcher=$!
# shellcheck disable=SC2329  # called by the traps below
forward() {
    local ranks
    ranks=$(pgrep -P "$(pgrep -P "$launcher" | head -n 1)" 2>/dev/null | tr '\n' ' ')
    echo "launch/local.sh: SIG$1 -> ranks ${ranks:-?}" >&2
    # shellcheck disable=SC2086  # a list of pids
    [ -n "$ranks" ] && kill -s "$1" $ranks
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM INT
while :; do
    wait "$launcher"
    rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$launcher" 2>/dev/null; then continue; fi  # a trap interrupted wait
    break
done
exit "$rc"
