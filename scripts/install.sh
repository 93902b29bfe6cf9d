#!/usr/bin/env bash
# Create (or complete) the project's virtual environment in $VENV (default .venv).
#
# fairseq: PyPI's fairseq==0.12.2 neither builds (its sdist lacks balanced_assignment.cpp) nor
# imports on Python >= 3.11, so we take ve-fairseq==0.12.3 (prebuilt cp311/cp312 wheels) there and
# fairseq-fixed==0.12.3.1 (built from source, ~3 min) on other Pythons. Both declare torchaudio,
# which pins a torch that would pull a multi-GB CUDA build: fairseq goes in with --no-deps and its
# real runtime needs come from requirements.txt.
# torchtitan (el_fairseq.torchtitan, optional): also --no-deps, as its datasets<4.8 pin would take a
# huggingface_hub that transformers 5 refuses; its runtime needs are in requirements.txt.
# torch: an importable torch is kept as it is; otherwise torch==2.13.0 (a CPU wheel on this kind of
# machine; set TORCH_SPEC to choose another, e.g. a CUDA build on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV with $($PY --version 2>&1)"
  if [ "${VENV_SYSTEM_SITE:-0}" = 1 ]; then "$PY" -m venv --system-site-packages "$VENV"; else "$PY" -m venv "$VENV"; fi
fi
VPY="$VENV/bin/python"
pip_i() { "$VPY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }

if ! "$VPY" -c 'import torch' 2>/dev/null; then
  echo "[install] torch: $TORCH_SPEC"
  pip_i "$TORCH_SPEC"
fi
echo "[install] runtime requirements"
pip_i -r requirements.txt
if ! "$VPY" -c 'import fairseq' 2>/dev/null; then
  minor=$("$VPY" -c 'import sys; print(sys.version_info[1])')
  if [ "$minor" = 11 ] || [ "$minor" = 12 ]; then spec=ve-fairseq==0.12.3; else spec=fairseq-fixed==0.12.3.1; fi
  echo "[install] fairseq: $spec (--no-deps)"
  pip_i --no-deps "$spec"
fi
if ! "$VPY" -c 'import torchtitan' 2>/dev/null; then
  echo "[install] torchtitan==0.3.0 (--no-deps)"
  pip_i --no-deps torchtitan==0.3.0
fi
echo "[install] el-fairseq (editable)"
pip_i --no-deps --no-build-isolation -e .
"$VPY" -c 'import torch, fairseq, el_fairseq; print("[install] ok: torch", torch.__version__, "fairseq", fairseq.__version__)'
# Build the compiled CPU loss kernel now rather than at the first training step.
"$VPY" -c 'from el_fairseq.loss import native as n; print("[install] native CPU kernel:", "built" if n.available() else "unavailable (" + n.error() + "), the chunked torch path will be used")'
