#!/usr/bin/env python
"""`python launch/stage2.py --help` / `deepspeed [--num_gpus N] launch/stage2.py ...`"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from remix_ds.cli import stage_main  # noqa: E402

if __name__ == "__main__":
    stage_main(2)
