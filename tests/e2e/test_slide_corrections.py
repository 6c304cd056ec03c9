"""Correcting a slide: per-slide MPP overrides (`wsi mpp`) and `wsi reprocess`, through the real local stack.

- a slide whose file says 0.25 um/px but is registered (CSV, by file name) at 0.5 is tiled at 0.5, and the
  plan says where that came from;
- a slide without any MPP is rejected (as before) without an override, accepted with one (registered by
  upload key before the upload, or registered afterwards and re-run with `wsi reprocess`);
- `wsi reprocess` with another QC setting gives a second tiling run and a second prediction beside the
  first, and the slide ends `predicted` again;
- bad input is a readable line and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from wsitk.shared.contracts import new_meta, pb, profile_id, tiling_run_id
from wsitk.shared.corrections import CorrectionError, lookup_override, parse_mpp_csv, parse_settings
from wsitk.shared.slides.reader import mpp_for
from wsitk.shared.slides.synth import SynthSpec, generate_slide

from tests.conftest import Pipeline

TERMINAL = {"predicted", "rejected", "failed", "no_tissue"}


# -- without servers -----------------------------------------------------------------------------------
def test_a_slide_override_wins_over_the_files_own_mpp_and_fills_a_missing_one() -> None:
    measured = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}
    assert mpp_for(measured, 0.3, slide_override=0.5) == mpp_for({}, 0.0, slide_override=0.5)
    assert (mpp_for(measured, slide_override=0.5).x, mpp_for(measured, slide_override=0.5).source) == (
        0.5,
        "slide-override",
    )
    assert mpp_for(measured, 0.3).source == "properties"  # the global override still only fills a gap


def test_mpp_csv_errors_name_the_line(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text(
        "# lab corrections\nslide,mpp,reason\ncase-1/a.svs,0.5,scanner wrote 0.25\nAB12CD34EF,0.25\n"
    )
    entries = parse_mpp_csv(good)
    assert [(e.slide_ref, e.mpp, e.reason, e.line) for e in entries] == [
        ("case-1/a.svs", 0.5, "scanner wrote 0.25", 3),
        ("ab12cd34ef", 0.25, "", 4),  # a slide id prefix is matched in lower case
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,mpp\na.svs,0.5\nb.svs,fast\nc.svs,50\n,0.5\na.svs,0.25\n")
    with pytest.raises(CorrectionError) as error:
        parse_mpp_csv(bad)
    message = str(error.value)
    assert "bad.csv line 3: mpp 'fast' is not a number" in message
    assert "bad.csv line 4: mpp 50 is outside 0.05-20 um/px" in message
    assert "bad.csv line 5: the slide is empty" in message
    assert "bad.csv line 6: 'a.svs' is already given 0.5 um/px on line 2" in message
    headerless = tmp_path / "headerless.csv"
    headerless.write_text("a.svs,0.5\n")
    with pytest.raises(CorrectionError, match=r"line 1: the header .* lacks slide and mpp"):
        parse_mpp_csv(headerless)


def test_reprocess_settings_are_checked() -> None:
    assert parse_settings(["qc_min_tissue_fraction=0.3"]) == {"qc_min_tissue_fraction": 0.3}
    with pytest.raises(CorrectionError, match="not a setting reprocess changes"):
        parse_settings(["target_mpp=0.25"])
    with pytest.raises(CorrectionError, match="outside 0-1"):
        parse_settings(["qc_min_tissue_fraction=3"])
    with pytest.raises(CorrectionError, match="expected NAME=VALUE"):
        parse_settings(["qc_min_tissue_fraction"])


# -- the recorder with a second run, against the real PostgreSQL ------------------------------------------
@pytest.mark.e2e
def test_the_recorder_keeps_every_run_and_the_newest_drives_the_status(stack: Any) -> None:
    from wsitk.services.recorder.handler import RecorderHandler
    from wsitk.shared.bus.runtime import Incoming
    from wsitk.shared.config import Settings
    from wsitk.shared.context import ServiceContext

    settings = Settings(
        **{
            k.removeprefix("WSI_").lower(): v
            for k, v in stack.env().items()
            if k.startswith("WSI_") and k != "WSI_HOME"
        },
        interop_results=False,  # the DICOM/FHIR results are tests/e2e/test_dicom_e2e.py's business
    )
    ctx = ServiceContext(settings, "recorder")
    recorder = RecorderHandler(ctx)
    slide = uuid.uuid4().hex
    first = pb.PipelineProfile(target_mpp=0.5, tile_size=224, qc_min_tissue_fraction=0.5)
    first.profile_id = profile_id(first)
    second = pb.PipelineProfile()
    second.CopyFrom(first)
    second.qc_min_tissue_fraction, second.profile_id = 0.3, ""
    second.profile_id = profile_id(second)
    run1, run2 = tiling_run_id(slide, first), tiling_run_id(slide, second)
    offsets = iter(range(10**6))

    def write(*events: Any) -> None:
        messages = [Incoming("t", 0, next(offsets), None, b"", [], e) for e in events]
        assert recorder.handle_batch(messages) == [[] for _ in messages]

    def meta(*parts: str) -> pb.EventMeta:
        return new_meta(service="test", slide_id=slide, event_parts=[uuid.uuid4().hex, *parts])

    def ingested(profile: pb.PipelineProfile, origin: str = "") -> pb.SlideIngested:
        source = pb.ObjectRef(bucket="uploads", key=f"{slide}.svs", etag="e")
        return pb.SlideIngested(
            meta=meta(), source=source, upload_key=source.key, profile=profile, origin=origin
        )

    def plan(profile: pb.PipelineProfile, run: str) -> pb.TilePlan:
        return pb.TilePlan(
            meta=meta(), tiling_run_id=run, profile=profile, shard_ids=["s00000"], total_tiles=3
        )

    def prediction(run: str) -> pb.Prediction:
        return pb.Prediction(
            meta=meta(), prediction_id=f"{run}-m", tiling_run_id=run, model_version="m", label="normal"
        )

    def status() -> tuple[Any, ...]:
        return ctx.db.execute(
            "SELECT status, tiling_run_id, profile_id FROM slides WHERE slide_id = %s", (slide,)
        )[0]

    # the plan may reach the recorder before the ingested event: the run is the slide's first either way
    write(plan(first, run1), ingested(first))
    assert status() == ("tiled", run1, first.profile_id)
    write(prediction(run1), ingested(first))  # a redelivered ingested event changes nothing
    assert status() == ("predicted", run1, first.profile_id)

    write(ingested(second, origin="reprocess"))  # a new run: the slide starts over
    assert status() == ("ingested", run2, second.profile_id)
    write(prediction(run1), plan(first, run1))  # late events of the first run: recorded, status untouched
    assert status() == ("ingested", run2, second.profile_id)
    write(plan(second, run2), prediction(run2))
    assert status() == ("predicted", run2, second.profile_id)
    runs = ctx.db.execute(
        "SELECT tiling_run_id, origin FROM slide_runs WHERE slide_id = %s ORDER BY started_at", (slide,)
    )
    assert runs == [(run1, "upload"), (run2, "reprocess")]
    predictions = ctx.db.execute(
        "SELECT tiling_run_id FROM predictions WHERE slide_id = %s ORDER BY 1", (slide,)
    )
    assert sorted(r[0] for r in predictions) == sorted([run1, run2])
    ctx.db.close()


# -- end to end ----------------------------------------------------------------------------------------
def _wsi(pipeline: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    return pipeline.cli(*args, timeout_s=120)


@dataclass
class Uploaded:
    tag: str
    keys: dict[str, str]  # name -> upload key
    slide_ids: dict[str, str]  # name -> slide id


def _slide_id(pipeline: Pipeline, key: str) -> str:
    return str(pipeline.query("SELECT slide_id FROM slide_sources WHERE upload_key = %s", (key,))[0][0])


def _plans(pipeline: Pipeline, slide_id: str) -> list[pb.TilePlan]:
    rows = pipeline.query(
        "SELECT plan FROM scorer_plans WHERE slide_id = %s ORDER BY received_at", (slide_id,)
    )
    return [pb.TilePlan.FromString(bytes(r[0])) for r in rows]


@pytest.fixture(scope="module")
def uploaded(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Uploaded]:
    """Three small slides: one whose file says 0.25 (registered at 0.5 by file name in a CSV), one without
    MPP registered by upload key before the upload, one without MPP and without an override."""
    tag = uuid.uuid4().hex[:8]
    folder = tmp_path_factory.mktemp("corrections")
    specs = {
        "wrong-mpp": (
            "svs",
            SynthSpec(width=2400, height=1800, mpp=0.25, fmt="svs", seed=91_001, tumour_fraction=0.3),
        ),
        "no-mpp-registered": (
            "tiff",
            SynthSpec(width=1600, height=1200, fmt="tiff", seed=91_002, with_mpp=False),
        ),
        "no-mpp": ("tiff", SynthSpec(width=1600, height=1200, fmt="tiff", seed=91_003, with_mpp=False)),
    }
    keys = {}
    for name, (ext, spec) in specs.items():
        generate_slide(folder / f"{name}-{tag}.{ext}", spec)
        keys[name] = f"corrections-{tag}/{name}-{tag}.{ext}"
    table = folder / "lab-mpp.csv"
    table.write_text(
        "slide,mpp,reason\n"
        f"wrong-mpp-{tag}.svs,0.5,scanner profile wrote 40x for a 20x scan\n"
        f"{keys['no-mpp-registered']},0.5,exported without resolution\n"
    )
    result = _wsi(pipeline, "mpp", "set", "--csv", str(table))
    assert result.returncode == 0, result.stderr
    assert "no slide known by this name yet" in result.stdout
    for name, ext in (("wrong-mpp", "svs"), ("no-mpp-registered", "tiff"), ("no-mpp", "tiff")):
        pipeline.upload(folder / f"{name}-{tag}.{ext}", keys[name])

    def done() -> bool:
        statuses = pipeline.statuses(list(keys.values()))
        return len(statuses) == len(keys) and set(statuses.values()) <= TERMINAL

    pipeline.wait_for(done, 240, "the three slides to reach an outcome")
    outcomes = pipeline.query(
        "SELECT src.upload_key, s.status, s.reason_code, s.status_reason FROM slide_sources src "
        "JOIN slides s USING (slide_id) WHERE src.upload_key = ANY(%s)",
        (list(keys.values()),),
    )
    print("outcomes:", outcomes)  # shown when a test below fails
    yield Uploaded(tag, keys, {name: _slide_id(pipeline, key) for name, key in keys.items()})


@pytest.mark.e2e
def test_a_registered_mpp_wins_over_the_files_own(pipeline: Pipeline, uploaded: Uploaded) -> None:
    slide = uploaded.slide_ids["wrong-mpp"]
    assert pipeline.statuses([uploaded.keys["wrong-mpp"]]) == {uploaded.keys["wrong-mpp"]: "predicted"}
    (plan,) = _plans(pipeline, slide)
    assert (plan.level0_mpp, plan.level0_mpp_source) == (0.5, "slide-override")
    assert plan.profile.slide_mpp_override == 0.5 and plan.level == 0
    assert plan.tile_size_level0 == plan.profile.tile_size  # 0.5 um/px tiles cut at level 0, no resampling
    assert pipeline.query("SELECT mpp, mpp_source FROM slides WHERE slide_id = %s", (slide,)) == [
        (0.5, "slide-override")
    ]
    listing = _wsi(pipeline, "mpp", "list")
    assert f"wrong-mpp-{uploaded.tag}.svs" in listing.stdout and "scanner profile wrote 40x" in listing.stdout


@pytest.mark.e2e
def test_a_slide_without_mpp_needs_an_override(pipeline: Pipeline, uploaded: Uploaded) -> None:
    registered, bare = uploaded.keys["no-mpp-registered"], uploaded.keys["no-mpp"]
    assert pipeline.statuses([registered, bare]) == {registered: "predicted", bare: "rejected"}
    ((code, reason),) = pipeline.query(
        "SELECT reason_code, status_reason FROM slides WHERE slide_id = %s", (uploaded.slide_ids["no-mpp"],)
    )
    assert code == "no-mpp" and "wsi mpp set" in reason
    (plan,) = _plans(pipeline, uploaded.slide_ids["no-mpp-registered"])
    assert (plan.level0_mpp, plan.level0_mpp_source) == (0.5, "slide-override")

    # Registered afterwards, by slide id prefix: `wsi reprocess` has ingest inspect the upload again.
    slide = uploaded.slide_ids["no-mpp"]
    result = _wsi(pipeline, "mpp", "set", slide[:12], "0.5", "--reason", "exported without resolution")
    assert result.returncode == 0 and f"wsi reprocess --slides {slide[:12]}" in result.stdout, result
    result = _wsi(pipeline, "reprocess", "--slides", slide[:12])
    assert result.returncode == 0, result.stderr
    pipeline.wait_for(lambda: pipeline.statuses([bare]) == {bare: "predicted"}, 120, "the re-ingested slide")
    (plan,) = _plans(pipeline, slide)
    assert (plan.level0_mpp, plan.level0_mpp_source) == (0.5, "slide-override")
    assert lookup_override_for(pipeline, slide, bare) == 0.5


def lookup_override_for(pipeline: Pipeline, slide_id: str, key: str) -> float | None:
    from wsitk.shared.db.connection import Database

    db = Database(pipeline.settings().dsn())
    try:
        found = lookup_override(db, slide_id, [key])
    finally:
        db.close()
    return found.mpp if found else None


@pytest.mark.e2e
def test_reprocess_with_another_qc_setting_adds_a_run_and_a_prediction(
    pipeline: Pipeline, uploaded: Uploaded
) -> None:
    key, slide = uploaded.keys["wrong-mpp"], uploaded.slide_ids["wrong-mpp"]
    assert pipeline.statuses([key]) == {key: "predicted"}
    ((first_prediction, first_run),) = pipeline.query(
        "SELECT prediction_id, tiling_run_id FROM predictions WHERE slide_id = %s", (slide,)
    )
    result = _wsi(
        pipeline,
        "reprocess",
        "--slides",
        slide,
        "--set",
        "qc_min_tissue_fraction=0.3",
        "--reason",
        "QC too strict",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[0])
    assert summary["changed"]["qc_min_tissue_fraction"]["to"] == 0.3
    assert summary["profile_id"] != summary["previous_profile_id"]

    def second_prediction() -> bool:
        rows = pipeline.query("SELECT count(*) FROM predictions WHERE slide_id = %s", (slide,))
        return rows[0][0] == 2 and pipeline.statuses([key]) == {key: "predicted"}

    pipeline.wait_for(second_prediction, 120, "the reprocessed slide's second prediction")
    rows = pipeline.query(
        "SELECT prediction_id, tiling_run_id FROM predictions WHERE slide_id = %s ORDER BY recorded_at",
        (slide,),
    )
    assert rows[0] == (first_prediction, first_run)  # the first one is kept
    assert rows[1][1] != first_run
    plans = {p.tiling_run_id: p for p in _plans(pipeline, slide)}
    assert set(plans) == {first_run, rows[1][1]}
    assert plans[rows[1][1]].profile.qc_min_tissue_fraction == pytest.approx(0.3)
    assert plans[rows[1][1]].profile.slide_mpp_override == 0.5  # the registered MPP stays
    ((status, current, runs),) = pipeline.query(
        "SELECT status, tiling_run_id, runs FROM v_slide_status WHERE slide_id = %s", (slide,)
    )
    assert (status, current, runs) == ("predicted", rows[1][1], 2)
    # the reconciler re-announces a stalled reprocessed slide with its reprocess profile, not the upload's
    from wsitk.shared.context import ServiceContext
    from wsitk.shared.corrections import reannounce_reprocessed

    ctx = ServiceContext(pipeline.settings(), "test")
    again = reannounce_reprocessed(ctx, slide)
    ctx.db.close()
    assert again is not None and isinstance(again.message, pb.SlideIngested)
    assert again.message.origin == "reprocess" and "QC too strict" in again.message.reason
    assert tiling_run_id(slide, again.message.profile) == rows[1][1]
    detail = _wsi(pipeline, "status", "--slide", slide)
    assert detail.returncode == 0 and "reprocess" in detail.stdout and "QC too strict" in detail.stdout
    assert detail.stdout.count("P(tumour)") == 2, detail.stdout


@pytest.mark.e2e
def test_bad_input_is_a_readable_line_and_exit_code_2(
    pipeline: Pipeline, uploaded: Uploaded, tmp_path: Path
) -> None:
    slide = uploaded.slide_ids["wrong-mpp"]
    bad_csv = tmp_path / "lab.csv"
    bad_csv.write_text("slide,mpp\nok.svs,0.5\nbroken.svs,0,5\n")
    cases = {
        ("reprocess", "--slides", "0123456789abcdef"): "no such slide",
        ("reprocess", "--slides", slide, "--set", "qc_min_tissue_fraction=lots"): "not a number",
        ("reprocess", "--slides", slide, "--set", "tile_size=512"): "not a setting reprocess changes",
        ("reprocess", "--slides", slide, "--mpp", "50"): "outside 0.05-20 um/px",
        ("mpp", "set", "--csv", str(bad_csv)): "lab.csv line 3: mpp 0 is outside",
        ("mpp", "set", "a.svs", "0.0"): "outside 0.05-20",
        ("mpp", "set", "--csv", str(tmp_path / "missing.csv")): "no such file",
        ("status", "--slide", "0123456789abcdef"): "no such slide",
    }
    for args, expected in cases.items():
        result = _wsi(pipeline, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    # nothing half-done: the bad CSV registered none of its rows
    assert "ok.svs" not in _wsi(pipeline, "mpp", "list").stdout
