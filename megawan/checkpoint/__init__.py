"""Reading and writing released Wan checkpoints (official and diffusers layouts)."""
