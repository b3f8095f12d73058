"""ConvMAE (Gao et al., NeurIPS 2022): masked convolution meets masked autoencoders."""
