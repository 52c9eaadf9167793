from setuptools import find_packages, setup

setup(
    name="megawan",
    version="0.1.0",
    description="Megatron-style training and inference of Wan 2.2 TI2V-5B (DiT + VAE38)",
    python_requires=">=3.11",
    packages=find_packages(include=["megawan", "megawan.*"]),
    # model presets (read through importlib.resources) and the fitted tiny VAE folders (presets/vae38/<name>/)
    package_data={"megawan.presets": ["*/*.json", "*/*.yaml", "vae38/*/*"]},
    install_requires=[
        "torch>=2.4",
        # megawan patches private APIs of these two (megawan/compat.py): the versions the patches are written
        # for; another version fails loudly at the first patch that no longer applies
        "megatron-core==0.16.1",
        "safetensors>=0.4",
        "numpy",
        "einops",
        "tqdm",
        "pyyaml",
        "psutil",  # megatron dist_checkpointing's writer; host memory check
        "tensorboard",
        "av>=12",
        "transformers>=4.45",  # umT5 text encoder (megawan.tools.precompute, megawan.generate)
        "pillow>=10.1",  # PNG contact sheets and curves (its bundled font), image inputs (megawan.generate)
        "torchao==0.18.0",  # float8 scales / casts / scaled GEMM of the native FP8 path (megawan/layers/fp8.py)
    ],
    extras_require={
        # diffusers is the independent reference; the CPU video decoders are compared with each other
        # (torchcodec 0.13 is the last CPU build: it needs the system's ffmpeg libraries).
        # accelerate: diffusers' WanTransformer3DModel.from_pretrained refuses to load without it (fp32-kept
        # modules need low_cpu_mem_usage); tests/test_export_files.py loads an export that way, as a user does
        "test": ["pytest>=8", "diffusers>=0.35", "accelerate", "torchcodec==0.13.0", "decord==0.6.0",
                 "scikit-image>=0.22"],  # the independent PSNR / SSIM
        "diffusers": ["diffusers>=0.35", "accelerate"],  # loading an export with diffusers' from_pretrained
        "gpu": ["transformer-engine[pytorch]", "flash-attn", "PyNvVideoCodec"],
    },
)
