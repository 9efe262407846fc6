#!/usr/bin/env bash
# Creates .venv and installs sdlora with its test tools. Safe to run again: it does
# nothing when pyproject.toml has not changed since the last install.
#
# torch comes first, chosen for the machine: a CUDA build where an NVIDIA driver is
# present, otherwise the CPU build (pip takes a local CPU wheel of torch 2.13.0 when
# the machine provides one). Set SDLORA_TORCH to force a spec, e.g. "torch==2.5.1".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
stamp=.venv/.sdlora-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if [ -n "${SDLORA_TORCH:-}" ]; then spec=$SDLORA_TORCH
  elif command -v nvidia-smi >/dev/null 2>&1; then spec="torch"
  else spec="torch==2.13.0"
  fi
  echo "installing $spec" >&2
  "$VPY" -m pip install -q "$spec"
fi
"$VPY" -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
