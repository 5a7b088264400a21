"""Model code. Shape letters used in comments throughout:

B batch, C channels, H/W grid height/width, N image tokens, L latent tokens, S levels,
D model width, K codebook size, V vocabulary (generator), T sequence length.
"""
