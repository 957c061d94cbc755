"""Runs examples/deepspeed_train.py under torchrun without DeepSpeed's CPU shared-memory op (it compiles with g++
for about 90 s on a fresh machine; the example's collectives are gloo's either way)."""

import importlib.util
import sys
from pathlib import Path

import deepspeed.comm.torch  # noqa: F401  (the module is patched through sys.modules)

sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
path = Path(__file__).resolve().parents[1] / "examples" / "deepspeed_train.py"
spec = importlib.util.spec_from_file_location("deepspeed_train", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.main(sys.argv[1:])
