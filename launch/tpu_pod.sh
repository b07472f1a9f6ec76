#!/usr/bin/env bash
# apo_jax on a Cloud TPU VM pod slice: the same command on every worker, one JAX process each.
#
#   launch/tpu_pod.sh --name apo-v5p --zone us-east5-a --project my-proj --accelerator v5p-32 \
#       --workdir gs://my-bucket/runs/apo_8b --create -- \
#       --config.model.hf_path=/mnt/bucket/ckpt/Meta-Llama-3-8B-Instruct \
#       --config.data.train=/mnt/bucket/data/clair/train
#
# Steps: (optionally) create the slice; copy this checkout (git HEAD) to every worker; install
# the package with jax[tpu] and gcsfuse; mount the workdir's bucket at /mnt/bucket on every worker
# (checkpoints, metrics and exports are written through it, so every worker sees the same
# directory and a preempted run resumes from it); run `python -m apo_jax.train` on all workers
# with `--worker=all`; copy each worker's log to <workdir>/logs and then to --log-dir here.
# JAX detects the slice's coordinator, process count and id itself (config.distributed.mode=on).
# Re-running the same command resumes from the newest checkpoint in the workdir. Exit status 75
# means the run was stopped early by a signal (preemption, maintenance) after committing a
# checkpoint: recreate the slice if it is gone and re-run to resume (docs/reliability.md).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name NAME --zone ZONE --project PROJECT --accelerator TYPE \
                         --workdir gs://BUCKET/PATH [options] [-- flags for python -m apo_jax.train]

Required:
  --name NAME            TPU VM name
  --zone ZONE            e.g. us-east5-a (v5p), us-east5-b / europe-west4-a (v6e)
  --project PROJECT      Google Cloud project id
  --accelerator TYPE     slice type, e.g. v5p-32, v6e-64, v4-16
  --workdir gs://B/P     run directory on a Cloud Storage bucket (mounted with gcsfuse)
Options:
  --config PATH[:PRESET] run config (default configs/apo_down.py:llama3_8b)
  --create               create the slice first (gcloud compute tpus tpu-vm create)
  --runtime VERSION      TPU software version for --create (default per accelerator family)
  --spot                 with --create: a spot (preemptible) slice
  --no-install           skip copying code and installing (already set up)
  --log-dir DIR          where worker logs are collected here (default logs/<name>-<time>)
  --dry-run              print the gcloud commands, run nothing
  -h, --help
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

NAME="" ZONE="" PROJECT="" ACCEL="" WORKDIR="" RUNTIME="" LOG_DIR=""
CONFIG=configs/apo_down.py:llama3_8b
CREATE=0 SPOT=0 INSTALL=1 DRY_RUN=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name|--zone|--project|--accelerator|--workdir|--config|--runtime|--log-dir)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in
        --name) NAME=$2 ;; --zone) ZONE=$2 ;; --project) PROJECT=$2 ;; --accelerator) ACCEL=$2 ;;
        --workdir) WORKDIR=$2 ;; --config) CONFIG=$2 ;; --runtime) RUNTIME=$2 ;; --log-dir) LOG_DIR=$2 ;;
      esac
      shift 2 ;;
    --create) CREATE=1; shift ;;
    --spot) SPOT=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (train flags go after --; see --help)" ;;
  esac
done

[[ -n "$NAME" && -n "$ZONE" && -n "$PROJECT" && -n "$ACCEL" && -n "$WORKDIR" ]] \
  || die "--name, --zone, --project, --accelerator and --workdir are required (see --help)"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME': lowercase letters, digits and dashes"
[[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE' does not look like a zone (e.g. us-east5-a)"
[[ "$ACCEL" =~ ^(v[0-9]+[a-z]*)-([0-9]+)$ ]] || die "--accelerator '$ACCEL' is not a TPU type like v5p-32 or v6e-16"
FAMILY=${BASH_REMATCH[1]}
[[ "$WORKDIR" =~ ^gs://([a-z0-9][-_.a-z0-9]*)(/.*)?$ ]] \
  || die "--workdir must be on a bucket (gs://BUCKET/PATH) so every worker and a resumed run see it, got '$WORKDIR'"
BUCKET=${BASH_REMATCH[1]}
BUCKET_PATH=${BASH_REMATCH[2]#/}
[[ -n "$BUCKET_PATH" ]] || die "--workdir: give a path inside the bucket, e.g. gs://$BUCKET/runs/apo_8b"
[[ -f "${CONFIG%%:*}" ]] || die "--config: no file ${CONFIG%%:*} (run from the repository root)"
for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do
  case "$arg" in
    --config.distributed.*|--workdir=*|--config=*) die "'$arg' is set by this script; use its own options" ;;
  esac
done
if [[ -z "$RUNTIME" ]]; then
  case "$FAMILY" in
    v4) RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod|v5e) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p) RUNTIME=v2-alpha-tpuv5 ;;
    v6e) RUNTIME=v2-alpha-tpuv6e ;;
    *) die "no default --runtime for $FAMILY; pass --runtime" ;;
  esac
fi
LOG_DIR=${LOG_DIR:-logs/$NAME-$(date +%Y%m%d-%H%M%S)}
MOUNT=/mnt/bucket
RUN_DIR="$MOUNT/$BUCKET_PATH"  # the workdir as every worker sees it
CODE_DIR='$HOME/apo_jax'  # expanded on the workers
GC=(gcloud --project="$PROJECT")
SSH=("${GC[@]}" compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all)

q() { printf '%q ' "$@"; }
TRAIN="cd $CODE_DIR && . .venv/bin/activate && PYTHONUNBUFFERED=1 python -m apo_jax.train $(q "--config=$CONFIG" "--workdir=$RUN_DIR" --config.distributed.mode=on "${EXTRA[@]+"${EXTRA[@]}"}")"
REMOTE_SETUP="set -e; sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT;
command -v gcsfuse >/dev/null || { export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s);
  echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list;
  curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -;
  sudo apt-get update -q && sudo apt-get install -yq gcsfuse; }
mkdir -p $CODE_DIR && tar -xzf /tmp/apo_jax.tgz -C $CODE_DIR && cd $CODE_DIR
python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && pip install -q -e . 'jax[tpu]==0.10.2'"
# --rename-dir-limit: orbax commits a checkpoint by renaming its temporary directory.
REMOTE_MOUNT="mountpoint -q $MOUNT || gcsfuse --implicit-dirs --rename-dir-limit=200000 $BUCKET $MOUNT"
REMOTE_RUN="$REMOTE_MOUNT; mkdir -p $RUN_DIR/logs; W=\$(hostname);
{ $TRAIN; } 2>&1 | tee /tmp/apo_jax_train.log; rc=\${PIPESTATUS[0]};
cp /tmp/apo_jax_train.log $RUN_DIR/logs/\$W.log; exit \$rc"

CMDS=()
if [[ $CREATE -eq 1 ]]; then
  create=("${GC[@]}" compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$ACCEL" --version="$RUNTIME")
  [[ $SPOT -eq 1 ]] && create+=(--spot)
  CMDS+=("$(q "${create[@]}")")
fi
if [[ $INSTALL -eq 1 ]]; then
  CMDS+=("git archive --format=tar.gz -o /tmp/apo_jax.tgz HEAD")
  CMDS+=("$(q "${GC[@]}" compute tpus tpu-vm scp /tmp/apo_jax.tgz "$NAME:/tmp/apo_jax.tgz" --zone="$ZONE" --worker=all)")
  CMDS+=("$(q "${SSH[@]}" --command="$REMOTE_SETUP")")
fi
CMDS+=("$(q "${SSH[@]}" --command="$REMOTE_RUN")")
CMDS+=("mkdir -p $(q "$LOG_DIR") && $(q gcloud storage cp -r "$WORKDIR/logs" "$LOG_DIR/")")

echo "tpu_pod.sh: $ACCEL slice '$NAME' in $ZONE ($PROJECT), runtime $RUNTIME, workdir $WORKDIR (on workers: $RUN_DIR), logs -> $LOG_DIR"
for c in "${CMDS[@]}"; do echo "tpu_pod.sh: run: $c"; done
[[ $DRY_RUN -eq 1 ]] && exit 0

command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk/docs/install)"
status=0
last=$((${#CMDS[@]} - 1))
for i in "${!CMDS[@]}"; do
  if [[ $i -eq $last ]]; then  # collect logs even when training failed
    bash -c "${CMDS[$i]}" || echo "tpu_pod.sh: could not collect logs from $WORKDIR/logs" >&2
  else
    bash -c "${CMDS[$i]}" || { status=$?; echo "tpu_pod.sh: failed: ${CMDS[$i]}" >&2; [[ $i -eq $((last - 1)) ]] || exit "$status"; }
  fi
done
if [[ $status -eq 75 ]]; then
  echo "tpu_pod.sh: training stopped early (exit 75, resumable): re-run this command to resume" >&2
fi
exit "$status"
