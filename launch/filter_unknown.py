#!/usr/bin/env python
"""`python launch/filter_unknown.py --help`: split a factoid set into known / not-yet-known for a base model."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from remix_ds.filter_unknown import main  # noqa: E402

if __name__ == "__main__":
    main()
