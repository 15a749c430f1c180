"""Feature extraction and verification metrics."""
