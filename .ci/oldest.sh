#!/usr/bin/env bash
# The test suite against the oldest supported releases of the packages named in FLOORS: a virtual environment
# over the installed site-packages with each one pinned to its floor in pyproject.toml (read from there, not
# restated). Run after .ci/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
FLOORS="transformers peft"
PY=${PYTHON:-python3}
pins=$("$PY" - "$FLOORS" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for name in sys.argv[1].split():
    floor = [re.search(r">=\s*([\w.]+)", d).group(1) for d in deps if re.match(rf"{name}\b", d)]
    print(f"{name}=={floor[0]}")
PY
)
venv=$(mktemp -d)/oldest
"$PY" -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q $pins
"$venv/bin/python" -c "import transformers, peft; print('oldest: transformers', transformers.__version__, 'peft', peft.__version__)"
# left out here, to keep CI near 15 minutes: the benchmark and experiment scripts' end-to-end runs (the library they
# call is what the rest covers) and the Triton kernels against their references in the interpreter (torch and
# triton are the same releases in both runs; the main run has them), and their sm_90 builds
"$venv/bin/python" -m pytest -q --ignore tests/test_benchmarks.py --ignore tests/test_serving_benchmark.py \
  --ignore tests/test_kernels.py --ignore tests/test_sparse_kernel.py --ignore tests/test_paged_kernel.py \
  --ignore tests/test_gate_kernels.py --ignore tests/test_kernel_build.py
