"""Parallel building blocks of megawan's models (DiT layers; VAE layers prefixed vae_)."""
