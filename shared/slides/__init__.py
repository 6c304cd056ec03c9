"""Slide I/O: validate slides (reader), find tissue (tissue), cut tiles at a physical MPP (tiling)."""
