#!/usr/bin/env bash
# Set up aiida-equicsp on a fresh machine (CPU) and run the main job.
#   bash scripts/setup.sh                 # install + predict structures with the shipped perov_5 model
#   bash scripts/setup.sh --install-only  # install only (what CI does before the tests)
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first and pinned: a looser requirement lets pip pull a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev,aiida]'
.venv/bin/python - <<'PY'
import torch
assert torch.__version__ == "2.13.0+cpu", f"torch was replaced by {torch.__version__}"
print(f"torch {torch.__version__} OK")
PY

if [ "${1:-}" != "--install-only" ]; then
    rm -rf examples/out/SrTiO3
    .venv/bin/equicsp sample --checkpoint perov_5 --formula SrTiO3 --formula CaTiO3 --num-samples 2 \
        --steps 100 --seed 0 --out examples/out/SrTiO3
    cat examples/out/SrTiO3/index.json
fi
