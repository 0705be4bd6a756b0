"""The one door from model code (`ldm/models`, `ldm/modules`) into `ldm.speed`.

Model modules carry switches that speed code sets from outside (`CrossAttention.native_attention`,
`SpatialTransformer.token_merge_ratio`, `UNetModel.feature_reuse`, a layer's `compute_dtype`); when they run,
they call speed code only through the names below. This module imports no model code, so the two sides
cannot form an import loop (tests/test_layout.py checks both rules).
"""

from ldm.speed import native
from ldm.speed.feature_reuse import FeatureReuse
from ldm.speed.tiling import decode_tiled
from ldm.speed.token_merge import Merge, bipartite_merge
from ldm.speed.weight_cast import compute_dtype

__all__ = ["FeatureReuse", "Merge", "bipartite_merge", "compute_dtype", "decode_tiled", "native"]
