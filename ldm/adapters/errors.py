"""The one error type of ldm.adapters (a ValueError, so callers that report bad input as one line do so here)."""

from __future__ import annotations

import re


class AdapterError(ValueError):
    """A LoRA or embedding file cannot be used; the message is one line naming the file, the problem and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s+", " ", message).strip())
