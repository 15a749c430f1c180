"""The classifier layer: FullFC (baseline) and SampledFC (active rows from a weight store)."""
