#!/usr/bin/env bash
# Rebuild the demo zoo from scratch: train, evaluate and write a card for each model.
# Deterministic for a given machine (fixed seeds); takes about 30 minutes on 2 CPU cores.
# Usage: ./scripts/build_zoo.sh [model ...]   (default: all)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LS=.venv/bin/leanserve
PY=.venv/bin/python
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(stack-tiny ode-tiny-fixed6 ode-tiny)
for name in "${models[@]}"; do
  out=models/zoo/$name
  [ "$name" = ode-tiny-fixed6 ] && out=runs/$name  # ablation only: not shipped in the zoo
  if [ ! -f "$out/model.safetensors" ]; then
    $LS train "$name" --out "$out"
  fi
  $LS eval "$out"
  if [ "$name" = ode-tiny ]; then
    $PY -m models.card "$out" --compare runs/ode-tiny-fixed6 --command "leanserve train $name --out $out" >/dev/null
  elif [ "$name" != ode-tiny-fixed6 ]; then
    $PY -m models.card "$out" --command "leanserve train $name --out $out" >/dev/null
  fi
done
du -sh models/zoo
