from setuptools import find_packages, setup

setup(
    name="megawan",
    version="0.1.0",
    description="Megatron-style training and inference of Wan 2.2 TI2V-5B (DiT + VAE38)",
    python_requires=">=3.11",
    packages=find_packages(include=["megawan", "megawan.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16",
        "safetensors>=0.4",
        "numpy",
        "einops",
        "tqdm",
        "av>=12",
    ],
    extras_require={
        "test": ["pytest>=8", "diffusers>=0.35", "transformers>=4.45"],
        "gpu": ["transformer-engine[pytorch]", "flash-attn", "PyNvVideoCodec"],
    },
)
