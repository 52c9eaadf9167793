"""megawan's models: the Wan DiT (dit.py) and the VAE38 (vae.py)."""
