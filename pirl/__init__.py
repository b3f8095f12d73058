"""PIRL (Misra & van der Maaten, CVPR 2020): pretext-invariant representation learning."""
