#!/usr/bin/env python
"""Text to image with Stable Diffusion v1; see `python scripts/txt2img.py --help`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.cli.txt2img import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
