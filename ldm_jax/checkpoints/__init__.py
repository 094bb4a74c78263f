"""Checkpoint IO: exact key tables between PyTorch state dicts and ldm_jax parameters."""
