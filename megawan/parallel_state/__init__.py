"""Process groups for megawan: tensor (TP), context (CP), data (DP) and VAE spatial sharding.

``groups``: ``ParallelGroups`` and ``initialize`` / ``get_groups`` / ``destroy``. ``launch``: the
torchrun / SLURM environment. ``layout``: validation before any process group exists. Modules never
read globals: they take a ``ParallelGroups`` at construction.
"""

from megawan.parallel_state.groups import ParallelGroups, destroy, get_groups, initialize, is_initialized
from megawan.parallel_state.launch import launch_env
from megawan.parallel_state.layout import LayoutError, ParallelLayout

__all__ = [
    "LayoutError",
    "ParallelGroups",
    "ParallelLayout",
    "initialize",
    "get_groups",
    "is_initialized",
    "destroy",
    "launch_env",
]
