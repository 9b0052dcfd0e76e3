#!/usr/bin/env bash
# Shared by slurm/ppo_single_node.sbatch and slurm/ppo_multi_node.sbatch; not submitted itself.
#
#   detoxrl_job.sh batch [OVERRIDES...]  in the batch step (first node): starts one `srun` task per node, turns a
#                                        stop signal (USR1 ahead of the time limit, TERM) into a checkpoint of the
#                                        training, then requeues the job; the next run resumes from that checkpoint.
#   detoxrl_job.sh node [OVERRIDES...]   in each srun task: the same launcher as on a workstation,
#                                        `detoxrl-launch --run` (which runs `accelerate launch -m detoxrl.train`),
#                                        with this node's machine rank and the first node's address and port.
#
# Settings (environment variables; sbatch passes the submitting shell's environment on):
#   RECIPE          run recipe (YAML) for --config                          [configs/ppo/demo.yaml]
#   STRATEGY        detoxrl-launch --strategy: single_gpu ddp zero2 zero3 zero3_offload multi_node
#                                                                          [set by the sbatch script]
#   GPUS_PER_NODE   detoxrl-launch --gpus: 0 runs CPU processes             [the GPUs SLURM made visible]
#   PROCS_PER_NODE  detoxrl-launch --num-processes: training processes per node
#                                                                          [every GPU not set aside for reward/reference]
#   DETOXRL_HOME    the repository (recipes and configs are relative to it) [the submit directory]
#   STOP_TIMEOUT    seconds the training gets to finish its step and checkpoint after a stop signal; keep it below
#                   the --signal lead time                                 [170]
#   MAIN_PROCESS_IP    address of the first node for the rendezvous      [its NodeAddr in slurm.conf]
#   MAIN_PROCESS_PORT  rendezvous port on the first node                   [20000 + job id % 20000]
#   DETOXRL_REQUEUE set to 0 to stop without requeueing                     [1]
set -uo pipefail

: "${DETOXRL_HOME:=${SLURM_SUBMIT_DIR:-$PWD}}"
: "${RECIPE:=configs/ppo/demo.yaml}"
: "${STRATEGY:=ddp}"
: "${STOP_TIMEOUT:=170}"
: "${MAIN_PROCESS_PORT:=$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
: "${DETOXRL_REQUEUE:=1}"
export DETOXRL_HOME RECIPE STRATEGY STOP_TIMEOUT MAIN_PROCESS_PORT

log() { echo "[detoxrl-slurm $(date +%H:%M:%S) ${SLURMD_NODENAME:-$(hostname)}] $*"; }

# ---- batch step --------------------------------------------------------------------------------------------------
batch() {
    srun_pid=""
    trap 'stop_training USR1' USR1
    trap 'stop_training TERM' TERM
    # the first node's NodeAddr (what SLURM itself reaches it at; it defaults to the NodeName): a NodeName need not
    # resolve (NodeName=gpu01 NodeAddr=10.0.0.1), and then the other nodes would wait forever at the rendezvous
    local first
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    : "${MAIN_PROCESS_IP:=$(scontrol show node -o "$first" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')}"
    : "${MAIN_PROCESS_IP:=$first}"
    export MAIN_PROCESS_IP
    log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: recipe $RECIPE, strategy" \
        "$STRATEGY, main process $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT"
    # all of each node's CPUs for its one task (srun no longer inherits --cpus-per-task from sbatch)
    srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
        --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 \
        bash "$DETOXRL_HOME/slurm/detoxrl_job.sh" node "$@" &
    srun_pid=$!
    wait "$srun_pid"  # a trapped signal interrupts this wait; stop_training then ends the script
    rc=$?
    log "training exited with status $rc"
    exit "$rc"
}

# The trap: forward the stop request, wait (bounded) until every process of the step has exited, kill what is
# left (a background process that outlives this script would outlive the job), then requeue.
stop_training() {
    trap '' USR1 TERM
    log "$1 received: the training finishes its step and writes a checkpoint (up to ${STOP_TIMEOUT}s)"
    local rc=0 deadline=$((SECONDS + STOP_TIMEOUT))
    if [ -n "$srun_pid" ]; then
        kill -USR1 "$srun_pid" 2>/dev/null  # srun forwards it to the processes of its step on every node
        while kill -0 "$srun_pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 1; done
        if kill -0 "$srun_pid" 2>/dev/null; then
            log "still running after ${STOP_TIMEOUT}s: killing it (the newest complete checkpoint is kept)"
            kill -TERM "$srun_pid" 2>/dev/null; sleep 5; kill -KILL "$srun_pid" 2>/dev/null
        fi
        wait "$srun_pid"; rc=$?
    fi
    if [ -n "$srun_pid" ] && [ "$rc" -eq 0 ]; then
        log "training finished"; exit 0
    fi
    if [ "$DETOXRL_REQUEUE" = 1 ]; then
        log "training stopped (status $rc): requeueing job $SLURM_JOB_ID; the next run resumes from its checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 75
}

# ---- one task per node ------------------------------------------------------------------------------------------
node() {
    local nnodes=${SLURM_JOB_NUM_NODES:-1} rank=${SLURM_NODEID:-0}
    local args=(--strategy "$STRATEGY" --config "$RECIPE" --nodes "$nnodes" --machine-rank "$rank"
                --main-address "${MAIN_PROCESS_IP:-127.0.0.1}" --main-port "$MAIN_PROCESS_PORT")
    [ -n "${GPUS_PER_NODE:-}" ] && args+=(--gpus "$GPUS_PER_NODE")
    [ -n "${PROCS_PER_NODE:-}" ] && args+=(--num-processes "$PROCS_PER_NODE")
    cd "$DETOXRL_HOME" || exit 2
    # torchrun SIGKILLs workers this long after relaying a TERM to them (default 30 s): give them time to checkpoint
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$STOP_TIMEOUT}
    launcher=""
    trap forward_stop USR1 TERM INT
    log "node $rank of $nnodes: detoxrl-launch ${args[*]} --run $*"
    # The launchers ignore the stop signals (an ignored signal stays ignored across fork and exec; SLURM signals
    # every process of the step): only the training processes, which install their own handlers, act on them.
    ( trap '' USR1 TERM INT; exec detoxrl-launch "${args[@]}" --run "$@" ) &
    launcher=$!
    local rc
    while :; do
        wait "$launcher"; rc=$?
        kill -0 "$launcher" 2>/dev/null || break  # else a trapped signal interrupted the wait
    done
    exit "$rc"
}

descendants() {
    local child
    command -v pgrep >/dev/null || return 0
    for child in $(pgrep -P "$1"); do echo "$child"; descendants "$child"; done
}

# SLURM already signals every process of the step; this also reaches the training processes where the site's
# process tracking signals only the task itself (they are the launcher's grandchildren, in their own session).
forward_stop() {
    [ -n "$launcher" ] && kill -USR1 $(descendants "$launcher") 2>/dev/null
    return 0
}

case "${1:-}" in
    batch) shift; batch "$@" ;;
    node) shift; node "$@" ;;
    *) echo "usage: $0 batch|node [detoxrl-train overrides...] (called by slurm/*.sbatch)" >&2; exit 2 ;;
esac
