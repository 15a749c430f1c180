"""hfs: massive classification with dynamic class selection (HF-softmax)."""

__version__ = "0.1.0"
