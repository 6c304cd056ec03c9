"""Entry point: ``wsi run mil-scorer`` (a faust-streaming worker, see stream.py)."""

from __future__ import annotations

from wsitk.shared.config import Settings


def main(settings: Settings) -> int:
    from wsitk.services.mil_scorer.stream import run

    return run(settings)
