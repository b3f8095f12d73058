"""Barlow Twins (Zbontar et al., ICML 2021), faithful to facebookresearch/barlowtwins."""
