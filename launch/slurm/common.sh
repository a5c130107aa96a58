# Shared by the sbatch scripts (sourced, not run). Expects REPO set (to find the venv); sets PYTHON, PATH,
# DS_ACCELERATOR, OMP threads.
# shellcheck shell=bash

# Steps (srun) get this script's whole environment -- what it sets up (PYTHON, MASTER_ADDR/PORT, the hostfile for
# MODE=deepspeed, DS_ACCELERATOR, OMP_NUM_THREADS) and what was submitted (NCCL_*, LD_LIBRARY_PATH, PYTHONPATH, ...):
# with `sbatch --export=NONE` or `--export=A,B`, Slurm would otherwise pass that restriction on to every srun in the
# job (sbatch(1), --export), and ranks on other nodes would start without them.
export SLURM_EXPORT_ENV=ALL

log() { echo "[$(date -u +%H:%M:%S) ${SLURM_JOB_ID:-}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}] $*" >&2; }
die() { log "ERROR: $*"; exit 2; }

setup_python() {
    # PYTHON: the repo's .venv when there is one (clusters: set PYTHON or activate a venv/conda env before sbatch).
    # shellcheck source=launch/lib.sh
    . "$REPO/launch/lib.sh"
    find_python "$REPO"
    PATH="$(dirname "$(command -v "$PYTHON")"):$PATH"  # mpirun, deepspeed from the same environment
    export PYTHON PATH
    # no cd: relative paths in the job's arguments mean what they meant where it was submitted (sbatch starts the
    # job in the submit directory)
}

setup_device() {
    # DEVICE=auto|cuda|cpu. cpu -> DeepSpeed's CPU accelerator; one thread per rank unless the job gave more.
    case "${DEVICE:=auto}" in
        cpu) export DS_ACCELERATOR=cpu ;;
        cuda|gpu|auto) ;;
        *) die "DEVICE=$DEVICE: expected auto, cuda or cpu" ;;
    esac
    export DEVICE
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
}

# run_step CMD...: run CMD (an srun step) in the background and wait for it, so that the batch shell can act on
# signals meanwhile. SIGUSR1 (from `#SBATCH --signal=B:USR1@N` or `scancel --signal=USR1 --batch`) is forwarded
# to every process of the job's steps (not back to this shell); SIGTERM (scancel, preemption, time limit) already
# reached them from Slurm, so it is only noted. Sets STEP_RC, GOT_USR1, GOT_TERM.
GOT_USR1=0
GOT_TERM=0
_STEP_PID=
_TRAPPED=0
_on_usr1() {
    GOT_USR1=1; _TRAPPED=1
    log "SIGUSR1: asking the training ranks to checkpoint and stop"
    scancel --signal=USR1 "$SLURM_JOB_ID" || log "scancel --signal=USR1 failed"
}
_on_term() { GOT_TERM=1; _TRAPPED=1; log "SIGTERM: the job is being stopped; ranks checkpoint if they have time"; }
# from the moment this file is sourced: bash's default action for SIGUSR1 would end the batch shell, losing the requeue
trap _on_usr1 USR1
trap _on_term TERM

run_step() {
    if [ "$GOT_USR1" = 1 ]; then  # the signal came while the job was still setting up: nothing to save, go again
        log "SIGUSR1 arrived before the step started: not starting it"
        STEP_RC=75
        return
    fi
    "$@" &
    _STEP_PID=$!
    while :; do
        _TRAPPED=0
        wait "$_STEP_PID"
        STEP_RC=$?
        # a trap interrupts `wait` with 128+signal while the step runs on: wait again for its real status
        if [ "$_TRAPPED" = 1 ] && [ "$STEP_RC" -gt 128 ] && kill -0 "$_STEP_PID" 2>/dev/null; then continue; fi
        break
    done
    export STEP_RC
}

# maybe_requeue: exit 75 (the engine checkpointed on a signal), or a step that died after our SIGUSR1, means
# "continue later": put the job back in the queue (it resumes from the newest complete checkpoint). A job being
# cancelled (SIGTERM) is not requeued here: scancel means stop, and preemption with PreemptMode=REQUEUE requeues
# by itself. MAX_REQUEUES bounds a job that keeps failing right after a signal.
maybe_requeue() {
    local restarts="${SLURM_RESTART_COUNT:-0}"
    if [ "$GOT_TERM" = 1 ]; then return 0; fi
    if [ "$STEP_RC" = 75 ] || { [ "$GOT_USR1" = 1 ] && [ "$STEP_RC" != 0 ]; }; then
        if [ "$restarts" -ge "${MAX_REQUEUES:-20}" ]; then
            log "not requeueing: already restarted $restarts times (MAX_REQUEUES=${MAX_REQUEUES:-20})"
            return 0
        fi
        log "requeueing job $SLURM_JOB_ID (exit $STEP_RC, restart $((restarts + 1))); it resumes from the newest \
complete checkpoint"
        scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed (submit with --requeue?)"
        exit 0
    fi
}
