"""1X World Model dataset (raw v2.0 release): layout and clip reader."""

from megawan.data.world_model_1x.dataset import WorldModel1XConfig, WorldModel1XDataset
from megawan.data.world_model_1x.layout import NUM_STATES, Shard1X, discover_shards

__all__ = ["WorldModel1XConfig", "WorldModel1XDataset", "NUM_STATES", "Shard1X", "discover_shards"]
