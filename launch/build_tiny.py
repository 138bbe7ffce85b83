#!/usr/bin/env python
"""`python launch/build_tiny.py --help` / `deepspeed [--num_gpus N] launch/build_tiny.py ...`"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from remix_ds.cli import build_tiny_main  # noqa: E402

if __name__ == "__main__":
    build_tiny_main()
