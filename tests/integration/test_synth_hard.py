"""The hard synthetic benchmark: mimic tissue classes, small tumours, sized slides, a held-out site, label
noise; and the default generator, which must stay byte for byte what it was before any of it existed.

Mimic appearance is checked on small rendered windows placed by the truth masks (where the mask is
deepest), through nuclear statistics: coverage, darkness and a size proxy (the share of nuclear pixels
that survive two erosions: small nuclei vanish).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from wsitk.shared.cli import build_parser
from wsitk.shared.slides.synth import (
    CohortParameters,
    SynthSpec,
    generate_labelled_cohort,
    generate_slide,
    hard_parameters,
    load_truth,
    plan_labelled_cohort,
    write_labelled_cohort,
)
from wsitk.shared.slides.synth.hard import HELD_OUT_LOOK, TILER_TILE_UM
from wsitk.shared.slides.synth.render import _slide_renderer

# sha256 over "name=sha256\n" lines of every file written by _write_default_outputs, computed with the
# generator as it was before mimics, subtle tumours and the hard cohort were added.
DEFAULT_OUTPUTS_SHA256 = "5b4be316254763c9b035c59f533e4844cbc2bdcd4e27e04c0daeeb7b57a000dc"

ALL_MIMICS = (("lymphoid", 0.1), ("reactive", 0.1), ("necrosis", 0.06), ("fat", 0.1), ("mucin", 0.06))


def _write_default_outputs(out: Path) -> str:
    generate_slide(out / "n.svs", SynthSpec(width=1200, height=900, seed=3))
    generate_slide(out / "t.svs", SynthSpec(width=1200, height=900, seed=4, tumour_fraction=0.3))
    generate_slide(
        out / "t.tiff",
        SynthSpec(
            width=1000,
            height=800,
            seed=5,
            fmt="tiff",
            tumour_fraction=0.2,
            nucleus_scale=1.1,
            stain_shift=(1.1, 0.9),
        ),
    )
    generate_labelled_cohort(out / "cohort", patients=4, size=(800, 640), seed=2, fmt="mixed")
    lines = [
        f"{path.relative_to(out)}={hashlib.sha256(path.read_bytes()).hexdigest()}\n"
        for path in sorted(out.rglob("*"))
        if path.is_file()
    ]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def test_default_generator_is_byte_identical_to_before_the_hard_benchmark(tmp_path: Path) -> None:
    assert _write_default_outputs(tmp_path) == DEFAULT_OUTPUTS_SHA256


# -- mimic classes -------------------------------------------------------------------------------------


def _window_stats(spec: SynthSpec) -> dict[str, dict[str, float]]:
    """Nuclear and colour statistics of a 96 px window where each class's mask is deepest."""
    renderer = _slide_renderer(spec)
    layout = renderer.layout
    masks = dict(layout.mimic_masks)
    masks["tumour"] = layout.tumour_mask
    masks["normal"] = layout.tissue_mask & ~layout.tumour_mask & ~np.any(list(masks.values()), axis=0)
    stats = {}
    size = 96
    for name, mask in masks.items():
        depth = ndimage.distance_transform_edt(mask)
        y, x = np.unravel_index(np.argmax(depth), depth.shape)
        assert depth[y, x] * layout.downsample >= size / 2 + 16, f"{name}: region too small to measure"
        x0 = int((x + 0.5) * layout.downsample) - size // 2
        y0 = int((y + 0.5) * layout.downsample) - size // 2
        image = renderer.render(1, x0, y0, size, size).astype(np.float64)
        density = -np.log(np.maximum(image, 1.0) / 255.0)
        nuclear = density[..., 0] > 0.5  # haematoxylin absorbs red; eosin barely does
        _, count = ndimage.label(nuclear)
        stats[name] = {
            "coverage": float(nuclear.mean()),
            "count": float(count),
            "darkness": float(density[..., 0][nuclear].mean()) if nuclear.any() else 0.0,
            "size": float(ndimage.binary_erosion(nuclear, iterations=2).sum() / max(nuclear.sum(), 1)),
            "stroma_eosin": float(density[..., 1][~nuclear].mean()),
            "white": float((image.min(axis=-1) > 200).mean()),
            "red": float(image[..., 0].mean()),
            "blue": float(image[..., 2].mean()),
        }
    return stats


@pytest.mark.parametrize("seed", [5, 6])
def test_mimic_classes_render_where_their_masks_say_and_look_as_designed(seed: int) -> None:
    spec = SynthSpec(width=3000, height=2400, seed=seed, tumour_fraction=0.12, mimics=ALL_MIMICS)
    stats = _window_stats(spec)
    normal, tumour = stats["normal"], stats["tumour"]
    lymphoid, reactive = stats["lymphoid"], stats["reactive"]
    # lymphoid aggregates: more, smaller and darker nuclei than tumour
    assert lymphoid["count"] > 2 * tumour["count"]
    assert lymphoid["size"] < tumour["size"] - 0.1
    assert lymphoid["darkness"] > tumour["darkness"]
    # reactive epithelium: between normal and tumour in coverage, darkness and size
    for key in ("coverage", "darkness", "size"):
        assert normal[key] < reactive[key] < tumour[key], (key, normal[key], reactive[key], tumour[key])
    # necrosis: many tiny fragments on stronger eosin
    assert stats["necrosis"]["count"] > 2 * normal["count"]
    assert stats["necrosis"]["size"] < 0.1
    assert stats["necrosis"]["stroma_eosin"] > normal["stroma_eosin"]
    # fat: large empty vacuoles; mucin: pale blue-grey with few nuclei
    assert stats["fat"]["white"] > 0.3
    assert normal["white"] < 0.05
    assert stats["mucin"]["blue"] > stats["mucin"]["red"] and normal["blue"] < normal["red"]
    assert stats["mucin"]["count"] < normal["count"]


def test_a_subtle_tumour_is_closer_to_normal_than_the_classic_one() -> None:
    classic = _window_stats(SynthSpec(width=3000, height=2400, seed=5, tumour_fraction=0.12))
    subtle = _window_stats(
        SynthSpec(width=3000, height=2400, seed=5, tumour_fraction=0.12, tumour_look="subtle")
    )
    for key in ("coverage", "darkness"):
        assert classic["normal"][key] < subtle["tumour"][key] < classic["tumour"][key]
    assert subtle["normal"] == classic["normal"]  # only the tumour changes


def test_mimic_masks_are_exclusive_and_their_shares_are_recorded(tmp_path: Path) -> None:
    spec = SynthSpec(width=2400, height=1800, seed=8, tumour_fraction=0.03, mimics=ALL_MIMICS)
    truth = generate_slide(tmp_path / "m.svs", spec)
    loaded = load_truth(tmp_path / "m.svs")
    assert loaded.spec == spec
    assert set(loaded.class_masks) == {name for name, _ in ALL_MIMICS}
    stacked = np.stack([loaded.tumour_mask, *loaded.class_masks.values()]).astype(int)
    assert stacked.sum(axis=0).max() == 1  # no cell in two classes
    assert not (stacked.any(axis=0) & ~loaded.tissue_mask).any()
    fractions = json.loads((tmp_path / "m.svs.truth.json").read_text())["class_fractions"]
    assert fractions == truth.class_fractions == loaded.class_fractions
    assert sum(fractions.values()) == pytest.approx(1.0)
    for name, share in ALL_MIMICS:
        assert fractions[name] == pytest.approx(share, abs=0.005)
    assert fractions["tumour"] == pytest.approx(0.03, abs=0.003)


def test_invalid_mimics_and_hard_parameters_are_named() -> None:
    with pytest.raises(ValueError, match=r"mimics \['granuloma'\] unknown.*tumour_look 'odd'|tumour_look"):
        SynthSpec(mimics=(("granuloma", 0.1),), tumour_look="odd")
    with pytest.raises(ValueError, match=r"mimic shares fat=0\.7"):
        SynthSpec(mimics=(("fat", 0.7),))
    with pytest.raises(ValueError) as error:
        CohortParameters(patients=10, sites=1, held_out_site=True, label_noise=0.5, tiles_per_slide=(9, 5))
    message = str(error.value)
    for part in ("held_out_site needs at least 2 sites", "label_noise 0.5", "tiles_per_slide 9-5"):
        assert part in message


# -- the hard cohort -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_the_held_out_site_is_always_entirely_in_the_test_split(seed: int) -> None:
    parameters = CohortParameters(
        patients=40 + 7 * seed,
        sites=3 + seed % 3,
        held_out_site=True,
        test_fraction=0.2,
        label_noise=0.05,
        size=(800, 600),
        seed=seed,
    )
    cohort = plan_labelled_cohort(Path("unused"), parameters)
    held_out = cohort.held_out_site
    assert held_out == f"site-{chr(ord('A') + parameters.sites - 1)}"
    members = [p for p in cohort.patients if p.site == held_out]
    assert members and {p.split for p in members} == {"test"}
    assert {p.label for p in members} == {"tumour", "normal"}
    others = [p for p in cohort.patients if p.site != held_out]
    assert {p.split for p in others} == {"test", "train"}
    assert 0.1 < sum(p.split == "test" for p in others) / len(others) < 0.3
    for slide in cohort.slides:
        assert (slide.spec.look == HELD_OUT_LOOK) == (slide.site == held_out)


@pytest.mark.parametrize(("patients", "share"), [(200, 0.05), (60, 0.05), (37, 0.1)])
def test_label_noise_flips_the_stated_share_of_patients(patients: int, share: float) -> None:
    parameters = CohortParameters(patients=patients, label_noise=share, size=(800, 600), seed=patients)
    cohort = plan_labelled_cohort(Path("unused"), parameters)
    flipped = [p for p in cohort.patients if p.recorded_label]
    assert len(flipped) == round(share * patients)
    assert all(p.recorded_label != p.label for p in flipped)
    assert len({p.label for p in flipped}) == 2 or len(flipped) < 4


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_small_hard_cohort_has_small_tumours_sized_slides_splits_and_noisy_labels(tmp_path: Path) -> None:
    parameters = hard_parameters(
        7, seed=3, tiles_per_slide=(15, 30), slides_per_patient=(1, 2), label_noise=0.3
    )
    cohort = write_labelled_cohort(tmp_path, parameters)
    rows = _read(cohort.labels_path)
    assert list(rows[0]) == ["slide", "patient", "label", "site", "tumour_fraction", "split", "true_label"]
    summary = json.loads(cohort.summary_path.read_text())
    assert summary["held_out_site"] == "site-D"
    assert len(summary["label_noise"]["flipped_patients"]) == 2
    low, high = parameters.tumour_fraction
    tumour_slides = 0
    for row in rows:
        truth = load_truth(tmp_path / row["slide"])
        assert row["true_label"] == truth.label
        patient = summary["patients"][row["patient"]]
        flipped = row["patient"] in summary["label_noise"]["flipped_patients"]
        assert row["label"] == (patient["recorded_label"] if flipped else truth.label)
        assert row["split"] == patient["split"] == ("test" if row["site"] == "site-D" else row["split"])
        if truth.label == "tumour":
            tumour_slides += 1
            assert low * 0.85 <= truth.tumour_fraction_actual <= high * 1.15
        tiles = truth.tissue_fraction * truth.width * truth.height * (truth.mpp / TILER_TILE_UM) ** 2
        assert 15 * 0.75 <= tiles <= 30 * 1.25, (row["slide"], tiles)
        assert truth.class_fractions and truth.spec.tumour_look == "subtle"
    assert tumour_slides >= 2
    assert Counter(row["split"] for row in rows)["test"] >= 2


def test_wsi_synth_hard_writes_the_preset_and_names_misplaced_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()

    def run(*argv: str) -> int:
        args = parser.parse_args(["synth", *argv])
        return int(args.handler(args))

    argv = ("--patients", "3", "--slides-per-patient", "1", "--hard", "--tiles", "10-12", "--sites", "2")
    assert run(str(tmp_path / "c"), *argv) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("labels: ")
    parameters = json.loads((tmp_path / "c" / "cohort.json").read_text())["parameters"]
    assert parameters["held_out_site"] and parameters["mimics"] and parameters["label_noise"] == 0.05
    assert parameters["tiles_per_slide"] == [10, 12] and parameters["tumour_look"] == "subtle"
    assert parameters["sites"] == 2 and parameters["slides_per_patient"] == [1, 1]
    assert run(str(tmp_path / "d"), "--patients", "4", "--tiles", "20") == 2
    assert "--tiles only apply with --hard" in capsys.readouterr().err
    assert run(str(tmp_path / "e"), "--patients", "4", "--hard", "--size", "900x900") == 2
    assert "--size does not apply with --hard" in capsys.readouterr().err
    assert run(str(tmp_path / "f"), "--hard") == 2
    assert "--hard only apply to a labelled cohort" in capsys.readouterr().err


def test_the_site_breakdown_reports_each_site_and_the_true_labels(tmp_path: Path) -> None:
    from wsitk.shared.models.by_site import add_site_breakdown

    rng = np.random.default_rng(0)
    lines = ["slide,slide_id,patient,site,label,tiles,tiles_scored,ens,ens fold 1,baseline"]
    true_labels = {}
    for index in range(40):
        site, label = "site-D" if index % 5 > 2 else "site-A", index % 2
        noisy = 1 - label if index == 5 else label
        true_labels[f"s{index}"] = label
        score, base = label + rng.normal(0, 0.3), rng.random()
        lines.append(f"s{index},id{index},p{index // 2 * 2 + label},{site},{noisy},9,9,{score},0.5,{base}")
    (tmp_path / "test_predictions.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "report.md").write_text("# R\n\n## Results\n\ntext\n\n## Limitations\n\nsynthetic\n")
    for _ in range(2):  # a second call replaces the section
        breakdown = add_site_breakdown(tmp_path, true_labels=true_labels, held_out_site="site-D")
    assert breakdown["models"] == ["ens", "baseline"]
    held_out = breakdown["labels"]["true labels"]["site-D"]
    assert held_out["slides"] == 16 and held_out["auc"]["ens"]["point"] > 0.9
    site_a = [i for i in range(40) if i % 5 <= 2]
    assert breakdown["labels"]["true labels"]["site-A"]["tumour_slides"] == sum(i % 2 for i in site_a)
    assert breakdown["labels"]["labels file"]["site-A"]["tumour_slides"] == sum(i % 2 for i in site_a) - 1
    report = (tmp_path / "report.md").read_text()
    assert report.count("### Results by site") == 1
    assert report.index("### Results by site") < report.index("## Limitations")
    assert "site-D (held out)" in report and "Against the true labels" in report
    assert json.loads((tmp_path / "by_site.json").read_text()) == breakdown
