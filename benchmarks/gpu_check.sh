#!/usr/bin/env bash
# The GPU check, one command of at most about 5 minutes on a lent GPU machine. It installs nothing and runs
# from the source tree: the GPU tests (tests/test_gpu.py, where pytest is importable), then the benchmark
# (benchmarks/gpu_check.py: BERT-base and BERT-large shapes, float32 and bfloat16, ratios to fused AdamW,
# the fraction of the device's copy bandwidth, first-use compile times). Extra arguments go to the benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.cuda.is_available(), '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
status=0
if "$PY" -c "import pytest" 2>/dev/null; then
    # the tests that compile nothing with inductor first, so that a slow cold compile cannot hide them
    timeout 50 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not compiled" || status=1
    timeout 70 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "compiled" || status=1
else
    echo "pytest is not importable here: the GPU tests are skipped"
fi
timeout 200 "$PY" benchmarks/gpu_check.py --budget 170 "$@" || status=1
exit $status
