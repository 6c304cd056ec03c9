"""The model lifecycle on the running pipeline: a labelled cohort goes through the six services, then
`wsi train` (three aggregators, patient folds) -> `wsi evaluate` (held-out test patients, bootstrap CIs,
baseline) -> register -> promote: the live scorer records the new version with no restart; `wsi rescore`
adds predictions of another version from stored embeddings; a model of another backbone is refused.

Short form of `wsi experiment` (which runs 60+ slides); the numbers here are not the acceptance numbers.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Pipeline

pytestmark = pytest.mark.e2e

TERMINAL = {"predicted", "rejected", "failed", "no_tissue"}


def _wsi(pipeline: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    return pipeline.cli(*args, timeout_s=300)


def _upload_and_wait(pipeline: Pipeline, paths: Mapping[str, Path], timeout_s: float) -> dict[str, str]:
    for key, path in paths.items():
        pipeline.upload(path, key)
    keys = list(paths)

    def done() -> bool:
        statuses = pipeline.statuses(keys)
        return len(statuses) == len(keys) and set(statuses.values()) <= TERMINAL

    pipeline.wait_for(done, timeout_s, f"{len(keys)} slides to reach an outcome")
    return pipeline.statuses(keys)


def test_cohort_to_trained_evaluated_promoted_and_rescored_models(pipeline: Pipeline, tmp_path: Path) -> None:
    from wsitk.shared.db.connection import Database
    from wsitk.shared.models.bags import load_bags
    from wsitk.shared.models.evaluate_run import evaluate_run
    from wsitk.shared.models.registry import RegistryError, deactivate, promote, register_model
    from wsitk.shared.models.training import Progress, TrainConfig, read_run, train_run
    from wsitk.shared.objectstore import open_store
    from wsitk.shared.slides.synth import SynthSpec, generate_labelled_cohort, generate_slide

    tag = uuid.uuid4().hex[:8]
    cohort = generate_labelled_cohort(
        tmp_path / "cohort",
        patients=10,
        slides_per_patient=(1, 2),
        tumour_fraction=(0.2, 0.4),
        sites=2,
        size=(2000, 1600),
        seed=11,
    )
    uploads = {f"lifecycle-{tag}/{s.file_name}": cohort.slide_path(s) for s in cohort.slides}
    statuses = _upload_and_wait(pipeline, uploads, 600)
    assert set(statuses.values()) == {"predicted"}, statuses

    settings = pipeline.settings()
    db = Database(settings.dsn())
    store = open_store(settings)
    sources = [
        (str(a), str(b))
        for a, b in db.execute(
            "SELECT slide_id, upload_key FROM slide_sources WHERE upload_key LIKE %s", (f"lifecycle-{tag}/%",)
        )
    ]
    requested: list[str] = []

    def loader(slide_ids: Sequence[str]) -> Mapping[str, Any]:
        requested.extend(slide_ids)
        return load_bags(db, store, slide_ids, cache_dir=tmp_path / "bags")

    run_dir = tmp_path / "run"
    record = train_run(
        cohort.labels_path,
        run_dir,
        TrainConfig(
            architectures=("gated-attention", "clam-sb", "dsmil"),
            folds=3,
            test_fraction=0.3,
            epochs=12,
            patience=4,
        ),
        sources=sources,
        bag_loader=loader,
        progress=Progress(every=4),
    )
    split = record["split"]["patient_split"]
    test_ids = {r["slide_id"] for r in record["rows"] if split[r["patient"]] == "test"}
    assert test_ids and not test_ids & set(requested), "training loaded held-out test slides"
    assert len({r["patient"] for r in record["rows"]}) == len(split)  # every patient in exactly one split

    requested.clear()
    metrics = evaluate_run(run_dir, bag_loader=loader, n_bootstrap=300)
    assert set(requested) == test_ids
    models = metrics["models"]
    assert {
        "gated-attention ensemble",
        "clam-sb ensemble",
        "dsmil ensemble",
        "baseline: mean-pool + LR",
    } <= set(models)
    report = (run_dir / "evaluation" / "report.md").read_text()
    assert "baseline: mean-pool + LR" in report
    assert re.search(r"\d\.\d{3} \(\d\.\d{3}-\d\.\d{3}\)", report), "no confidence interval in the report"
    for plot in ("roc.png", "calibration.png"):
        assert (run_dir / "evaluation" / plot).stat().st_size > 5000
    for name in ("gated-attention", "clam-sb", "dsmil"):
        assert metrics["onnx_vs_torch_max_abs_diff"][name] < 1e-4
    gated_auc = models["gated-attention ensemble"]["metrics"]["auc"]["point"]
    assert gated_auc is not None and gated_auc >= 0.75, models["gated-attention ensemble"]["metrics"]["auc"]

    # -- register + promote: the running scorer switches without a restart -------------------------------
    run = read_run(run_dir)
    manifest = json.loads((Path(pipeline.env["WSI_MODEL_DIR"]) / "models.json").read_text())
    gated = register_model(
        db,
        store,
        settings.artifacts_bucket,
        run_dir / run["models"]["gated-attention"]["onnx"],
        profile=run["profile"],
        metrics={"test": models["gated-attention ensemble"]},
        actor="test",
    )
    clam = register_model(
        db,
        store,
        settings.artifacts_bucket,
        run_dir / run["models"]["clam-sb"]["onnx"],
        profile=run["profile"],
    )
    scorer_pid = pipeline.pids()["mil-scorer"]
    try:
        promote(
            db, gated.model_version, actor="test", serving_backbone_id=manifest["backbone"]["backbone_id"]
        )
        listing = _wsi(pipeline, "model", "list")
        assert gated.model_version in listing.stdout and "active" in listing.stdout, listing
        new_slide = tmp_path / "after-promotion.svs"
        generate_slide(
            new_slide,
            SynthSpec(width=2000, height=1600, tumour_fraction=0.3, seed=777_000 + int(tag, 16) % 1000),
        )
        import time

        time.sleep(float(pipeline.env.get("WSI_MODEL_REFRESH_S", "5")) + 1)  # the services' registry cache
        key = f"lifecycle-{tag}/after-promotion.svs"
        assert _upload_and_wait(pipeline, {key: new_slide}, 300)[key] == "predicted"
        rows = pipeline.query(
            "SELECT p.model_version, p.heatmap_ref, p.top_tiles_ref FROM predictions p "
            "JOIN slide_sources s USING (slide_id) WHERE s.upload_key = %s",
            (key,),
        )
        assert [r[0] for r in rows] == [gated.model_version]
        assert pipeline.pids()["mil-scorer"] == scorer_pid, "the scorer was restarted"
        heatmap, top_tiles = rows[0][1], rows[0][2]
        assert heatmap and top_tiles, "explanations missing from the prediction"
        assert store.get_bytes(heatmap["bucket"], heatmap["key"])[:8] == b"\x89PNG\r\n\x1a\n"

        # -- rescore two slides with another version, from stored embeddings ------------------------------
        chosen = sorted(test_ids)[:2]
        embedded_before = sum(
            1 for s in chosen for _ in store.list_keys(settings.artifacts_bucket, f"embeddings/{s}/")
        )
        result = _wsi(pipeline, "rescore", "--model", clam.model_version, "--slides", *chosen)
        assert result.returncode == 0, result.stderr + result.stdout
        pipeline.wait_for(
            lambda: (
                pipeline.query(
                    "SELECT count(*) FROM predictions WHERE slide_id = ANY(%s) AND model_version = %s AND origin = 'rescore'",
                    (chosen, clam.model_version),
                )[0][0]
                == 2
            ),
            60,
            "the re-scored predictions to be recorded",
        )
        versions = pipeline.query(
            "SELECT slide_id, count(DISTINCT model_version) FROM predictions WHERE slide_id = ANY(%s) GROUP BY slide_id",
            (chosen,),
        )
        assert all(n == 2 for _, n in versions), versions  # new predictions beside the old
        embedded_after = sum(
            1 for s in chosen for _ in store.list_keys(settings.artifacts_bucket, f"embeddings/{s}/")
        )
        assert embedded_after == embedded_before  # nothing was re-embedded

        # -- a model trained on another backbone is refused, with a reason ------------------------------
        import torch
        from wsitk.shared.models.export import export_mil
        from wsitk.shared.models.mil import GatedAttentionMIL

        foreign = tmp_path / "foreign.onnx"
        torch.manual_seed(0)
        export_mil(
            GatedAttentionMIL(int(run["in_dim"])).eval(),
            foreign,
            in_dim=int(run["in_dim"]),
            model_version=f"foreign-{tag}",
            backbone_id="some-other-encoder-0123",
        )
        register_model(db, store, settings.artifacts_bucket, foreign)
        with pytest.raises(RegistryError, match="embedder serves"):
            promote(db, f"foreign-{tag}", serving_backbone_id=manifest["backbone"]["backbone_id"])
        refused = _wsi(pipeline, "rescore", "--model", f"foreign-{tag}", "--slides", chosen[0], "--dry-run")
        assert refused.returncode == 1
        outcome = json.loads(refused.stdout.splitlines()[0])
        assert outcome["outcome"] == "refused" and "some-other-encoder-0123" in outcome["reason"], outcome

        # -- QuPath export of the promoted model's attention --------------------------------------------
        slide_id = pipeline.query("SELECT slide_id FROM slide_sources WHERE upload_key = %s", (key,))[0][0]
        exported = _wsi(pipeline, "export", "geojson", slide_id, "--out", str(tmp_path / "geojson"))
        assert exported.returncode == 0, exported.stderr
        collection = json.loads((tmp_path / "geojson" / f"{slide_id}.geojson").read_text())
        assert collection["type"] == "FeatureCollection" and collection["features"]
        # The short id `wsi status` prints, and the upload key, name the same slide.
        for reference in (slide_id[:12], key):
            short = _wsi(pipeline, "export", "geojson", reference, "--out", str(tmp_path / "short"))
            assert short.returncode == 0, short.stderr
            assert (tmp_path / "short" / f"{slide_id}.geojson").is_file()
        unknown = _wsi(pipeline, "export", "geojson", "0123456789ab", "--out", str(tmp_path / "short"))
        assert (
            unknown.returncode == 1
            and "no such slide" in unknown.stderr
            and "Traceback" not in unknown.stderr
        )
    finally:
        deactivate(db, actor="test")  # later tests expect the shipped default model
