#!/usr/bin/env python
"""`python launch/merge.py BASE ADAPTER OUT [--dtype bf16] [--nf4]`: streaming LoRA merge on CPU."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from remix_ds.cli import merge_main  # noqa: E402

if __name__ == "__main__":
    merge_main()
