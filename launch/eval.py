#!/usr/bin/env python
"""`python launch/eval.py --help` / `deepspeed [--num_gpus N] launch/eval.py ...`"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from remix_ds.cli import eval_main  # noqa: E402

if __name__ == "__main__":
    eval_main()
