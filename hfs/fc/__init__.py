"""The classifier layer: FullFC (baseline) and SampledFC (active rows from a weight store)."""

from hfs.fc.common import FCOutput, predict_all_classes
from hfs.fc.full import FullFC
from hfs.fc.sampled import SampledFC

__all__ = ["FCOutput", "FullFC", "SampledFC", "predict_all_classes"]
