#!/usr/bin/env bash
# Create .venv (once) and install normopt with its test tools into it.
#
# torch: an environment that already has torch keeps it (GPU users bring their CUDA
# build). Otherwise torch==2.13.0 is installed first; on a machine without a GPU pass a CPU
# wheel index if pip's default one serves CUDA builds, e.g.
#   NORMOPT_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup_env.sh
# Re-running is cheap: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NORMOPT_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
vpy="$VENV/bin/python"
stamp="$VENV/.normopt-installed"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$vpy" -c "import normopt, torch" 2>/dev/null; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

if ! "$vpy" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch 2.13.0"
  if [ -n "${NORMOPT_TORCH_INDEX:-}" ]; then
    "$vpy" -m pip install -q --disable-pip-version-check torch==2.13.0 --index-url "$NORMOPT_TORCH_INDEX"
  else
    "$vpy" -m pip install -q --disable-pip-version-check torch==2.13.0
  fi
fi
echo "[setup] installing normopt and its dependencies"
"$vpy" -m pip install -q --disable-pip-version-check -e ".[test]"
echo "$want" > "$stamp"
echo "[setup] ready: $("$vpy" -c 'import torch; print("torch", torch.__version__)')"
