"""megawan: Megatron-style training and inference of Wan 2.2 TI2V-5B."""

__version__ = "0.1.0"
