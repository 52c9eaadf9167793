"""megawan's models: the Wan DiT (dit.py, dit_config.py); the VAE38 is its own package, megawan.vae."""
