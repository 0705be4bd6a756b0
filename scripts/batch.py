#!/usr/bin/env python
"""Batch generation from a prompt file, in this process or on Ray (the `ldm-batch` command); see --help."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.batch.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
