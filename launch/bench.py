#!/usr/bin/env python
"""`python launch/bench.py --help`: remix_ds's training step vs a plain PyTorch/PEFT loop (docs/benchmarks.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from remix_ds.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
