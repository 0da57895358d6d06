"""Streaming checkpoints bigger than memory: a rules file applied block by block (executor.py) over a
model built without weights (model.py)."""
from .executor import StreamReport, should_stream, stream_apply

__all__ = ["StreamReport", "should_stream", "stream_apply"]
