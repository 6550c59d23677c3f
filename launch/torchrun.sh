#!/usr/bin/env bash
# One node, N processes:  bash launch/torchrun.sh [NPROC] [--config PATH] [section.key=value ...]
# NPROC defaults to the number of visible GPUs (1 without GPUs; CPU ranks use gloo).
# The config is validated first in a single process, so a bad config exits 2 with one
# line instead of a failure report from every rank.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  nproc=$1; shift
elif command -v nvidia-smi >/dev/null 2>&1; then
  nproc=$(nvidia-smi -L | wc -l)
else
  nproc=1
fi
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PYTHON" -m normopt.cli check --nproc "$nproc" "$@" >/dev/null || exit $?
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" train.py "$@"
