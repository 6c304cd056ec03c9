"""``wsi export fhir|dicom SLIDE``: a slide's stored results for hospital systems, by slide id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsitk.shared.interop.publish import FHIR_NAME, PM_NAME, SR_NAME
from wsitk.shared.objectstore import ObjectStore

FILES = {"fhir": (FHIR_NAME,), "dicom": (SR_NAME, PM_NAME)}


def export_results(
    store: ObjectStore,
    bucket: str,
    slide_id: str,
    out_dir: Path,
    fmt: str,
    *,
    tiling_run_id: str = "",
    model_version: str = "",
) -> dict[str, Any]:
    """Copy the slide's FHIR Bundle (or DICOM SR + parametric map) to ``out_dir``; raises LookupError."""
    runs: set[tuple[str, str]] = set()
    for obj in store.list_keys(bucket, f"results/{slide_id}/"):
        parts = obj.key.split("/")
        if len(parts) == 5 and parts[4] == FILES[fmt][0]:
            runs.add((parts[2], parts[3]))
    chosen = sorted(
        (run, model)
        for run, model in runs
        if (not tiling_run_id or run == tiling_run_id) and (not model_version or model == model_version)
    )
    if not chosen:
        raise LookupError(
            f"no {fmt} results stored for slide {slide_id} (it has no prediction yet, or its prediction "
            "came before the results were enabled: `wsi rescore` it)"
        )
    if len(chosen) > 1:
        listed = ", ".join(f"--tiling-run {r} --model {m}" for r, m in chosen)
        raise LookupError(f"slide {slide_id} has several results; pick one with {listed}")
    run, model = chosen[0]
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in FILES[fmt]:
        key = f"results/{slide_id}/{run}/{model}/{name}"
        if store.stat(bucket, key) is None:
            continue
        path = out_dir / f"{slide_id}.{name}"
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(store.get_bytes(bucket, key))
        partial.replace(path)
        written.append(str(path))
    return {"slide_id": slide_id, "tiling_run_id": run, "model_version": model, "paths": written}
