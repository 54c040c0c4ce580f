#!/usr/bin/env bash
# Builds Show-o2's own environment (issue 17): a venv with Show-o2's pins (envs/showo2-constraints.txt)
# and grpo_lib installed into it, for tests/test_showo2_real.py.   Usage: scripts/showo2_env.sh VENV_DIR
# The third-party install (~5.4 GB, mostly torch 2.5.1's CUDA wheels, which also run on a CPU) is kept
# while the pins and pyproject.toml are unchanged (a stamp named by their hash); grpo_lib itself is
# re-linked to this clone on every call (seconds), so the venv may live outside the clone (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:?usage: scripts/showo2_env.sh VENV_DIR}
PINS="$PWD/envs/showo2-constraints.txt"
KEY=$(cat "$PINS" pyproject.toml | sha256sum | cut -c1-16)
STAMP="$VENV/.showo2-pins-$KEY"
# these pins replace the main venv's torch==2.13.0 constraint (.ci/run exports it) and /etc/xdg/pip's cap
export PIP_CONSTRAINT="$PINS"
if [ ! -f "$STAMP" ]; then
  start=$(date +%s)
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[showo2]"
  touch "$STAMP"
  echo "showo2-env: installed $VENV in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
else
  echo "showo2-env: $VENV is up to date with envs/showo2-constraints.txt + pyproject.toml ($KEY)"
fi
# grpo_lib from this clone (editable, no dependency changes)
if [ "$("$VENV/bin/python" -c 'import grpo_lib, pathlib; print(pathlib.Path(grpo_lib.__file__).resolve().parents[1])' 2>/dev/null)" != "$PWD" ]; then
  "$VENV/bin/python" -m pip install -q --no-deps -e .
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
from torchvision.ops import nms   # torch and torchvision built for each other (the registry pair)
nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
print("showo2-env:", ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "torchvision", "transformers", "diffusers", "accelerate", "peft", "timm", "einops")))
PY
