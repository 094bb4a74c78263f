"""PyTorch stand-ins for the parity tests (reference implementations not shipped as packages)."""
