"""Flax networks of ldm_jax: autoencoders, the latent UNet and the conditioning encoders."""
