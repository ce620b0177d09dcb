#!/usr/bin/env bash
# Run tunelab's SLURM tests against a real SLURM on loopback (../shared/tools/slurm-local).
#
#   bash scripts/ci_slurm.sh [pytest args...]      # start (if needed), pytest -m slurm, stop (if started)
#
# For .ci/run, either call this script, or start the cluster once around the whole suite so the
# @pytest.mark.slurm tests run with everything else (they skip when SLURM_CONF is unset):
#
#   export SLURM_LOCAL_NODES=2                      # two slurmd "nodes": the DDP job runs 2 nodes x 1 rank
#   eval "$(bash ../shared/tools/slurm-local/start.sh)"    # exports SLURM_CONF; ~1 s (+apt install once)
#   trap 'bash ../shared/tools/slurm-local/stop.sh' EXIT
#   OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo .venv/bin/python -m pytest
#
# Needs root (the daemons and jobs run as root). The tests themselves never start or stop the
# cluster: stop.sh cancels every job, which would break other users of a shared cluster.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${SLURM_LOCAL_TOOLS:-$ROOT/../shared/tools/slurm-local}
PY=${PYTHON:-$ROOT/.venv/bin/python}
export SLURM_LOCAL_NODES=${SLURM_LOCAL_NODES:-2}

if [[ -z ${SLURM_CONF:-} ]]; then
  [[ -f $TOOLS/start.sh ]] || { echo "ci_slurm.sh: no $TOOLS/start.sh (set SLURM_LOCAL_TOOLS)" >&2; exit 2; }
  eval "$(bash "$TOOLS/start.sh")"
  trap 'bash "$TOOLS/stop.sh"' EXIT
fi

cd "$ROOT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
"$PY" -m pytest -m slurm tests/test_launch.py "$@"
