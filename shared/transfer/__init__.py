"""Transfer to detection and segmentation: checkpoint converters (pure torch)."""
