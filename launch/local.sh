#!/usr/bin/env bash
# N training processes on this machine, joined by JAX's distributed runtime over localhost.
#
# Each process gets its own simulated CPU devices (or, with --devices-per-process 0, whatever
# accelerators JAX sees), so a laptop runs the same multi-host code path as a pod:
#
#   launch/local.sh -n 2 -d 4 --workdir /tmp/apo_2x4 -- --config.num_steps=20
#
# Process 0 prints to the terminal; every process also logs to <log-dir>/process_<i>.log. If one
# process fails the others are stopped; Ctrl-C / SIGTERM is passed on to all of them, and they
# save a checkpoint together before exiting with status 75 (stopped early, resumable). Run it
# again with the same workdir to resume.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] [-- extra flags for python -m apo_jax.train]

  -n, --num-processes N         processes to start (default 2)
  -d, --devices-per-process D   simulated CPU devices per process (default 4);
                                0 keeps JAX's platform choice (e.g. one GPU each, see below)
  -c, --config PATH[:PRESET]    run config (default configs/apo_down.py)
  -w, --workdir DIR             checkpoints, metrics and exports (default runs/local_<N>x<D>)
  -p, --port PORT               coordinator port on 127.0.0.1 (default: a free port)
  -t, --timeout S               seconds for all processes to join (default 120)
      --log-dir DIR             per-process logs (default <workdir>/logs)
      --python PY               interpreter (default: python)
      --dry-run                 print what would run, start nothing
  -h, --help

With -d 0 on a machine with several GPUs, set CUDA_VISIBLE_DEVICES per process yourself or
use the SLURM script; this script is meant for CPUs and for testing the multi-host path.
EOF
}

die() { echo "local.sh: $*" >&2; exit 2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

NPROC=2
DEVICES=4
CONFIG=configs/apo_down.py
WORKDIR=""
PORT=""
TIMEOUT=120
LOG_DIR=""
PYTHON=python
DRY_RUN=0
EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) [[ $# -ge 2 ]] || die "$1 needs a value"; NPROC=$2; shift 2 ;;
    -d|--devices-per-process) [[ $# -ge 2 ]] || die "$1 needs a value"; DEVICES=$2; shift 2 ;;
    -c|--config) [[ $# -ge 2 ]] || die "$1 needs a value"; CONFIG=$2; shift 2 ;;
    -w|--workdir) [[ $# -ge 2 ]] || die "$1 needs a value"; WORKDIR=$2; shift 2 ;;
    -p|--port) [[ $# -ge 2 ]] || die "$1 needs a value"; PORT=$2; shift 2 ;;
    -t|--timeout) [[ $# -ge 2 ]] || die "$1 needs a value"; TIMEOUT=$2; shift 2 ;;
    --log-dir) [[ $# -ge 2 ]] || die "$1 needs a value"; LOG_DIR=$2; shift 2 ;;
    --python) [[ $# -ge 2 ]] || die "$1 needs a value"; PYTHON=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (train flags go after --; see --help)" ;;
  esac
done

is_uint "$NPROC" && [[ $NPROC -ge 1 && $NPROC -le 64 ]] || die "--num-processes must be 1..64, got '$NPROC'"
is_uint "$DEVICES" && [[ $DEVICES -le 512 ]] || die "--devices-per-process must be 0..512, got '$DEVICES'"
is_uint "$TIMEOUT" && [[ $TIMEOUT -ge 1 ]] || die "--timeout must be a positive number of seconds, got '$TIMEOUT'"
[[ -f "${CONFIG%%:*}" ]] || die "--config: no file ${CONFIG%%:*} (run from the repository root)"
for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do
  case "$arg" in
    --config.distributed.*|--workdir=*|--config=*)
      die "'$arg' is set by this script; use its own options instead" ;;
  esac
done
WORKDIR=${WORKDIR:-runs/local_${NPROC}x${DEVICES}}
LOG_DIR=${LOG_DIR:-$WORKDIR/logs}
if [[ -z "$PORT" ]]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
    || die "could not pick a free port with $PYTHON; pass --port"
fi
is_uint "$PORT" && [[ $PORT -ge 1024 && $PORT -le 65535 ]] || die "--port must be 1024..65535, got '$PORT'"

ENV_COMMON=(JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$NPROC")
if [[ $DEVICES -gt 0 ]]; then
  ENV_COMMON+=(JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES")
fi
CMD=("$PYTHON" -m apo_jax.train "--config=$CONFIG" "--workdir=$WORKDIR"
     "--config.distributed.initialization_timeout=$TIMEOUT" "${EXTRA[@]+"${EXTRA[@]}"}")

echo "local.sh: $NPROC processes x $DEVICES devices, coordinator 127.0.0.1:$PORT, workdir $WORKDIR, logs $LOG_DIR"
for ((i = 0; i < NPROC; i++)); do
  printf 'local.sh: [%d] env' "$i"; printf ' %q' "${ENV_COMMON[@]}" "JAX_PROCESS_ID=$i"; printf ' %q' "${CMD[@]}"; echo
done
[[ $DRY_RUN -eq 1 ]] && exit 0

mkdir -p "$LOG_DIR"
PIDS=()
stop_all() {  # pass a signal on to every process still running
  for pid in "${PIDS[@]}"; do kill "-$1" "$pid" 2>/dev/null || true; done
}
trap 'stop_all TERM' TERM
trap 'stop_all INT' INT

for ((i = 0; i < NPROC; i++)); do
  log="$LOG_DIR/process_$i.log"
  if [[ $i -eq 0 ]]; then
    env "${ENV_COMMON[@]}" "JAX_PROCESS_ID=$i" "${CMD[@]}" > >(tee "$log") 2>&1 &
  else
    env "${ENV_COMMON[@]}" "JAX_PROCESS_ID=$i" "${CMD[@]}" >"$log" 2>&1 &
  fi
  PIDS+=($!)
done

# Poll rather than wait in order: a failed process must stop the others, which would otherwise
# sit in a collective until JAX's heartbeat timeout.
status=0
declare -a FINISHED
remaining=$NPROC
while [[ $remaining -gt 0 ]]; do
  for ((i = 0; i < NPROC; i++)); do
    [[ -z "${FINISHED[$i]:-}" ]] || continue
    kill -0 "${PIDS[$i]}" 2>/dev/null && continue
    rc=0
    wait "${PIDS[$i]}" || rc=$?
    FINISHED[$i]=1
    remaining=$((remaining - 1))
    if [[ $rc -eq 75 ]]; then  # stopped by a signal after a common checkpoint: resumable
      echo "local.sh: process $i stopped early (exit 75): run the same command to resume" >&2
      [[ $status -ne 0 ]] || status=75
    elif [[ $rc -ne 0 ]]; then
      echo "local.sh: process $i exited with status $rc; last lines of $LOG_DIR/process_$i.log:" >&2
      tail -n 5 "$LOG_DIR/process_$i.log" >&2 || true
      if [[ $status -eq 0 || $status -eq 75 ]]; then status=$rc; stop_all TERM; fi
    fi
  done
  [[ $remaining -gt 0 ]] && sleep 1
done
exit "$status"
