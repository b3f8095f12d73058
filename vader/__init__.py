"""VADeR (Pinheiro et al., NeurIPS 2020): view-agnostic dense representations by pixel-level contrast."""
