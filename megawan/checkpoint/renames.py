"""The one way megawan maps parameter names between spellings: ordered tables of name fragments.

A table is a list of (a, b) pairs, read in either direction (``src`` 0: a -> b, 1: b -> a). A
fragment ending in "." renames a prefix, any other an exact name; the first matching row wins, so
more specific rows come first. ``dit_keys`` and ``vae_keys`` both build their tables this way.
"""

from __future__ import annotations


def rename(key: str, table, src: int = 0) -> str | None:
    """``key`` renamed by the first matching row of ``table``; None when no row matches."""
    for row in table:
        old, new = row[src], row[1 - src]
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old):]
    return None
