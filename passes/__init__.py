"""Transformation passes over one decoder block: prune (choose what goes, compensate) and materialize (cut)."""
from .base import BlockPass, PassConditionError
from .prune_heads import HeadPruneResult, PruneHeads
from .prune_channels import ChannelPruneResult, PruneChannels
from .materialize import MaterializeChannels, MaterializeHeads, apply_masked_channels, apply_masked_heads
from .prune_dims import DimPruneResult, MaterializeDims, PruneReadDims, PruneWriteDims, apply_dims

__all__ = [
    "BlockPass", "PassConditionError", "PruneHeads", "HeadPruneResult", "PruneChannels", "ChannelPruneResult",
    "MaterializeHeads", "MaterializeChannels", "apply_masked_heads", "apply_masked_channels",
    "PruneReadDims", "PruneWriteDims", "DimPruneResult", "MaterializeDims", "apply_dims",
]
