"""normc: a declarative model-transformation compiler for trained PyTorch models."""
__version__ = "0.1.0"
