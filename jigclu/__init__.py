"""Jigsaw Clustering (Chen et al., CVPR 2021): montages of crops from several images, clustered and located."""
