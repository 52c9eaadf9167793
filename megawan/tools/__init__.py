"""Command-line tools: sample data generation and latent precompute."""
