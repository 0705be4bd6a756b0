"""Add-ons loaded on top of a base model: LoRA files merged into its weights (and unmerged exactly) and
textual-inversion embeddings added to its vocabulary, in the formats the community's tools write
(kohya/A1111, diffusers/PEFT). Model code does not import this package; generation and the command lines call
:func:`apply_adapters` and keep its handle to undo it."""

from ldm.adapters.api import AdapterHandle, adapters_for_prompts, apply_adapters
from ldm.adapters.errors import AdapterError

__all__ = ["AdapterError", "AdapterHandle", "adapters_for_prompts", "apply_adapters"]
