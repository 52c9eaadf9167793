"""VAE38, the Wan 2.2 TI2V-5B video VAE, spatially shardable: the model (model.py) and its layers.

partition: how a frame is tiled over ranks; halo: neighbour row/column exchange; conv: streaming
causal 3D convs, down/upsampling; norm, attention, blocks: the residual and mid blocks. Checkpoint
names and files live in megawan.checkpoint (vae_keys, vae_io), beside the DiT's.
"""

from megawan.vae.model import WanVAE38, WanVAE38Config

__all__ = ["WanVAE38", "WanVAE38Config"]
