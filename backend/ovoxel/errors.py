"""The codec's error type (its own module so that every codec module can import it without a cycle)."""

from __future__ import annotations

__all__ = ["OVoxelError"]


class OVoxelError(ValueError):
    """Invalid input or a request the codec refuses (with a readable reason)."""
