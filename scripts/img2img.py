#!/usr/bin/env python
"""Image to image (and inpainting) with Stable Diffusion v1; see `python scripts/img2img.py --help`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.cli.img2img import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
