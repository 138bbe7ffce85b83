#!/usr/bin/env python
"""`python launch/pipeline.py --help` / `deepspeed [--num_gpus N] launch/pipeline.py ...`"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from remix_ds.cli import pipeline_main  # noqa: E402

if __name__ == "__main__":
    pipeline_main()
