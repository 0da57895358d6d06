"""Checkpoints in the original layout: mapping a rewritten graph back onto the module's state-dict
keys (layout.py), sharded safetensors writing (writer.py), the `-o OUTDIR/` directory (hf_dir.py)."""
from .hf_dir import CheckpointWritten, LayoutRefused, write_hf_dir
from .layout import LayoutPlan, plan_layout
from .writer import ShardWriter, checkpoint_files, copy_side_files

__all__ = ["CheckpointWritten", "LayoutPlan", "LayoutRefused", "ShardWriter", "checkpoint_files",
           "copy_side_files", "plan_layout", "write_hf_dir"]
