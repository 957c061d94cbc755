#!/usr/bin/env python3
"""Thin wrapper: ``python benchmarks/bench.py [args]`` == ``torch-lamb bench [args]``."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from torch_lamb.bench import main

if __name__ == "__main__":
    sys.exit(main())
