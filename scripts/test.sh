#!/usr/bin/env bash
# The test suite, as CI runs it. Starts a throw-away SLURM on loopback for the launcher tests when
# the slurm-local tool is beside the checkout (../shared/tools/slurm-local) and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh  # TUNELAB_DATA_DIR, offline Hub, PY
SLURM_TOOL=../shared/tools/slurm-local
if [ -f "$SLURM_TOOL/start.sh" ] && [ "$(id -u)" = 0 ] && [ -z "${TUNELAB_NO_SLURM:-}" ]; then
  # two slurmd "nodes" so the multi-node (srun torchrun --nnodes 2) test runs too
  if out=$(SLURM_LOCAL_NODES=${SLURM_LOCAL_NODES:-2} bash "$SLURM_TOOL/start.sh" 2>/tmp/tunelab-slurm-start.log); then
    eval "$out"
    trap 'bash "$SLURM_TOOL/stop.sh" >/dev/null 2>&1 || true' EXIT
    echo "[test] local SLURM started (SLURM_CONF=${SLURM_CONF:-})"
  else
    echo "[test] local SLURM did not start; SLURM tests will be skipped (see /tmp/tunelab-slurm-start.log)"
  fi
fi
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
"$PY" -m pytest -q -ra "$@"
