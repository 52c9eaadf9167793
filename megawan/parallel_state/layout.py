"""Validation of a parallel layout, done before any process group or compute exists.

Context parallelism (CP) splits a sample's tokens over ``cp`` ranks; ``cp_impl`` says how the
self-attention sees the whole sequence (megawan/layers/attention.py):

* "ulysses": an all-to-all trades the token split for a head split, so each rank attends over all
  tokens for heads / (tp * cp) heads: needs (heads / tp) % cp == 0.
* "ring": each rank keeps its queries and the key/value blocks travel around the ring of CP ranks
  (megawan/layers/ring_attention.py): no rule on the heads.
* "hybrid": a CP group of ulysses_size x ring ranks: Ulysses inside groups of ``ulysses_size``
  consecutive CP ranks (which are consecutive TP groups: one node when tp * ulysses_size GPUs fit in it),
  ring across those groups: needs (heads / tp) % ulysses_size == 0.
"""

from __future__ import annotations

from dataclasses import dataclass

CP_IMPLS = ("ulysses", "ring", "hybrid")


class LayoutError(ValueError):
    """A tensor/context/data-parallel layout that megawan cannot run."""


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int = 1
    cp: int = 1
    cp_impl: str = "ulysses"
    ulysses_size: int | None = None  # hybrid only: the Ulysses group size (None elsewhere)

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.cp)

    @property
    def ulysses(self) -> int:
        """CP ranks in one Ulysses (all-to-all) group: cp for "ulysses", 1 for "ring"."""
        if self.cp_impl == "hybrid":
            return self.ulysses_size
        return self.cp if self.cp_impl == "ulysses" else 1

    @property
    def ring(self) -> int:
        """Ulysses groups in the ring: 1 for "ulysses", cp for "ring"."""
        return self.cp // self.ulysses

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
        self._validate_cp_impl()
        if num_heads is not None:
            if num_heads % self.tp != 0:
                raise LayoutError(
                    f"tp={self.tp} does not divide the {num_heads} attention heads "
                    f"(rule: heads % tp == 0, each TP rank owns whole heads)"
                )
            heads_per_tp = num_heads // self.tp
            if self.cp_impl == "ulysses" and heads_per_tp % self.cp != 0:
                raise LayoutError(
                    f"cp={self.cp} does not divide the {heads_per_tp} heads per TP rank "
                    f"({num_heads} heads / tp={self.tp}) (rule: Ulysses context parallelism needs "
                    f"(heads / tp) % cp == 0; cp_impl 'ring' or 'hybrid' goes beyond it)"
                )
            if self.cp_impl == "hybrid" and heads_per_tp % self.ulysses_size != 0:
                raise LayoutError(
                    f"ulysses_size={self.ulysses_size} does not divide the {heads_per_tp} heads per TP rank "
                    f"({num_heads} heads / tp={self.tp}) (rule: hybrid context parallelism needs "
                    f"(heads / tp) % ulysses_size == 0)"
                )
        return self

    def _validate_cp_impl(self) -> None:
        if self.cp_impl not in CP_IMPLS:
            raise LayoutError(f"cp_impl must be one of {CP_IMPLS}, got {self.cp_impl!r}")
        if self.cp_impl != "hybrid":
            if self.ulysses_size is not None:
                raise LayoutError(f"ulysses_size={self.ulysses_size} applies to cp_impl 'hybrid' only "
                                  f"(rule: cp_impl {self.cp_impl!r} takes no ulysses_size)")
            return
        u = self.ulysses_size
        if u is None or u < 1 or self.cp % u != 0:
            raise LayoutError(f"cp_impl 'hybrid' needs ulysses_size dividing cp={self.cp}, got {u} "
                              f"(rule: cp % ulysses_size == 0; cp = ulysses_size x ring size)")
