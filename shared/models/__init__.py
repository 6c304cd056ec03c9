"""Tile encoders (backbones) and slide aggregators (MIL): torch -> ONNX -> ONNX Runtime.

The modules split by what a process needs, so that a service image carries only its own dependencies:

- ``runtime``: ONNX Runtime only (no torch). The embedder and the mil-scorer import this and nothing else.
- ``backbones``, ``mil``, ``export``, ``defaults``: torch and ``onnx``, for building, training, exporting.

This package's ``__init__`` deliberately imports none of them.
"""
