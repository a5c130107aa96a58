#!/usr/bin/env bash
# Pretraining on this machine: N GPUs, or N CPU ranks, through the deepspeed launcher.
#
#   launch/local.sh [key=value overrides for pretraining/run.py]
#   NPROC=8 launch/local.sh data.shard_dir=shards/ model.init=/models/bert-base-cased max_steps=1000
#   DEVICE=cpu NPROC=2 CONFIG=tiny_cpu launch/local.sh data.shard_dir=demo_out/shards
#
# Settings (environment variables):
#   CONFIG      run config: a packaged recipe name or a path (default biobert_continued_seq512)
#   DS_CONFIG   DeepSpeed config    (default: the run config's deepspeed_config)
#   DEVICE      auto | cuda | cpu   (auto: cuda when nvidia-smi sees a GPU; cpu sets DS_ACCELERATOR=cpu)
#   NPROC       ranks               (default: every GPU; on CPU 2)
#   MASTER_PORT rendezvous port     (default: a free one; the rules are `biobert plan`'s)
#   PYTHON      interpreter         (default: $VIRTUAL_ENV, else the repo's .venv, else python3)
# Relative paths (CONFIG, data.shard_dir, output_dir) are taken from where you run this, as with any command.
# Exit code: the engine's (0 finished, 75 stopped by SIGTERM/SIGUSR1 after a checkpoint: run again to resume).
# Signals: SIGTERM/SIGINT/SIGUSR1 to this script reach the training ranks (they checkpoint and exit 75); the
# deepspeed launcher itself ignores SIGUSR1, so only the ranks act on it.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)  # only to find lib.sh and the venv: we do not cd there
# shellcheck source=launch/lib.sh
. "$REPO/launch/lib.sh"
find_python "$REPO"

DEVICE=${DEVICE:-auto}
case "$DEVICE" in auto|cpu|cuda|gpu) ;; *) echo "DEVICE=$DEVICE: expected auto, cuda or cpu" >&2; exit 2 ;; esac
export DEVICE
# master address/port and the accelerator: the shared launch rules (biobert.dist), not a second copy here
plan=$("$PYTHON" -m biobert plan --shell ${NPROC:+--nproc-per-node "$NPROC"}) || exit 2
eval "$plan"
if [ "$LAUNCH_ACCELERATOR" = cpu ]; then
    NPROC=${NPROC:-2}; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    NPROC=${NPROC:-$NPROC_PER_NODE}
fi
CONFIG=${CONFIG:-biobert_continued_seq512}
args=(--config "$CONFIG")
[ -n "${DS_CONFIG:-}" ] && args+=(--deepspeed_config "$DS_CONFIG")

echo "launch/local.sh: $NPROC ranks on $LAUNCH_ACCELERATOR, master $MASTER_ADDR:$MASTER_PORT, config $CONFIG" >&2
# The launcher runs in the background so this shell can pass signals to the ranks (the launcher would turn a
# SIGTERM into "kill the ranks and exit 1", losing the engine's exit code 75).
(trap '' USR1; exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$MASTER_PORT" \
    --module pretraining.run "${args[@]}" "$@") &
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
