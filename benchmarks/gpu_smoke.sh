#!/usr/bin/env bash
# On a GPU machine: the compiled-kernel tests, the demo and the transformers example, in one go.
# Usage (repo root, package importable): benchmarks/gpu_smoke.sh OUT_DIR
set -uo pipefail
out=${1:?usage: benchmarks/gpu_smoke.sh OUT_DIR}
mkdir -p "$out"
status=0
python -m pytest -q -p no:cacheprovider tests/test_triton_nvfp4.py tests/test_layers.py tests/test_reference.py \
  2>&1 | tee "$out/pytest.log" || status=1
python -m quantoracle.cli demo --out "$out/demo.json" 2>&1 | tee "$out/demo.txt" || status=1
python examples/transformers_nvfp4.py --device cuda --out "$out/transformers.json" 2>&1 \
  | tee "$out/transformers.log" || status=1
exit $status
