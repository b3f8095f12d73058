"""Data: the built-in synthetic dataset, ImageFolder, augmentation recipes, the reproducible sampler."""
