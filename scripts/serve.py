#!/usr/bin/env python
"""The image service (`ldm-serve`); see `python scripts/serve.py --help` and docs/serving.md."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.serve.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
