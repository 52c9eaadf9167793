"""Data pipeline: video decoders, the 1X World Model reader, captioned video folders, the latent cache,
and the sampler / loader that split them over data-parallel ranks and resume mid-epoch."""

from megawan.data.bad_input import BadInputError, BadInputReport
from megawan.data.captioned_folder import CaptionedFolderConfig, CaptionedVideoFolder
from megawan.data.decoders import available_backends, open_video
from megawan.data.loader import ClipLoader, collate_samples
from megawan.data.sampler import DistributedClipSampler
from megawan.data.world_model_1x import WorldModel1XConfig, WorldModel1XDataset

__all__ = [
    "BadInputError", "BadInputReport", "CaptionedFolderConfig", "CaptionedVideoFolder", "available_backends", "open_video", "ClipLoader", "collate_samples",
    "DistributedClipSampler", "WorldModel1XConfig", "WorldModel1XDataset",
]
