"""Validation of a parallel layout, done before any process group or compute exists."""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A tensor/context/data-parallel layout that megawan cannot run."""


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int = 1
    cp: int = 1

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.cp)

    def validate(self, num_heads: int | None = None) -> "ParallelLayout":
        """Check every rule the layout must satisfy; raise LayoutError naming the rule broken."""
        if self.tp < 1 or self.cp < 1 or self.world_size < 1:
            raise LayoutError(
                f"parallel sizes must be >= 1 (got world_size={self.world_size}, tp={self.tp}, cp={self.cp})"
            )
        if self.world_size % (self.tp * self.cp) != 0:
            raise LayoutError(
                f"world size {self.world_size} is not divisible by tp={self.tp} x cp={self.cp} = "
                f"{self.tp * self.cp} (rule: world_size % (tp*cp) == 0; dp = world_size / (tp*cp))"
            )
        if num_heads is not None:
            if num_heads % self.tp != 0:
                raise LayoutError(
                    f"tp={self.tp} does not divide the {num_heads} attention heads "
                    f"(rule: heads % tp == 0, each TP rank owns whole heads)"
                )
            heads_per_tp = num_heads // self.tp
            if heads_per_tp % self.cp != 0:
                raise LayoutError(
                    f"cp={self.cp} does not divide the {heads_per_tp} heads per TP rank "
                    f"({num_heads} heads / tp={self.tp}) (rule: Ulysses context parallelism needs "
                    f"(heads / tp) % cp == 0)"
                )
        return self
