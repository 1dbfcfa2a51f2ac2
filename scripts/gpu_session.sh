#!/usr/bin/env bash
# One call on the device machine (CONTRIBUTING.md, "A session with a GPU"): continue the mp_20 training run on
# CUDA, then the sampling checks; everything lands in $OUT (gpu_session.json, session.log, train.tar.part-NN).
#
#   scripts/gpu_session.sh [gpu_session.py session options: --minutes 8 --budget-minutes 9.5 --device cuda ...]
#
# Prepared here first with `.venv/bin/python benchmarks/gpu_session.py prepare` (the carry folder gpu_carry/).
# On the device machine python3 has torch but not pydantic: the carried wheels are installed into /tmp first.
# Here, `--guard` runs every Python process of the session under benchmarks/gpu_guard (imports of packages the
# device machine lacks fail), and EQUICSP_PYTHON chooses the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${EQUICSP_PYTHON:-python3}
CARRY=${EQUICSP_CARRY:-gpu_carry}
OUT_DIR=${OUT:-$(mktemp -d /tmp/gpu-session-out.XXXX)}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/session.log"
args=()
for arg in "$@"; do
  if [ "$arg" = "--guard" ]; then
    export PYTHONPATH="$PWD/benchmarks/gpu_guard${PYTHONPATH:+:$PYTHONPATH}" EQUICSP_GUARD_CARRY="$PWD/$CARRY"
  else
    args+=("$arg")
  fi
done
say() { echo "gpu_session.sh: $*" | tee -a "$LOG"; }
say "$(date -u +%FT%TZ) on $(hostname), python $($PYTHON -c 'import sys; print(sys.version.split()[0])')"
if [ -z "${EQUICSP_GUARD_CARRY:-}" ] && compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
  if $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/equicsp-site \
      "$CARRY"/wheels/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH="/tmp/equicsp-site${PYTHONPATH:+:$PYTHONPATH}"
    say "installed $(ls "$CARRY"/wheels | tr '\n' ' ')"
  else
    say "installing the carried wheels failed (see above in $LOG)"
  fi
fi
PYTHONUNBUFFERED=1 $PYTHON benchmarks/gpu_session.py session --out "$OUT_DIR" --carry "$CARRY" "${args[@]}" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
