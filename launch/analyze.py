#!/usr/bin/env python
"""`python launch/analyze.py --help` / `deepspeed [--num_gpus N] launch/analyze.py ...`: the logit-lens analysis."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from remix_ds.cli import analyze_main  # noqa: E402

if __name__ == "__main__":
    analyze_main()
