"""Reasons that reach public events (slide rejected, slide failed, dead letters) quote no path of the
machine that built them: a local path becomes the object key it was downloaded from, or its file name."""

from __future__ import annotations

from pathlib import Path

import pytest
from wsitk.shared.bus.delivery import Incoming, dead_letter_outputs
from wsitk.shared.contracts import new_meta, pb
from wsitk.shared.errors import PermanentError, scrub_local_paths
from wsitk.shared.topics import DEADLETTER, SLIDES_FAILED, SLIDES_INGESTED

CACHE_FILE = "/srv/lab/checkout/.wsi/cache/ingest/5d41402abc4b2a76b9719d911017c592.svs"


@pytest.mark.parametrize(
    ("text", "public"),
    [
        (f"cannot open {CACHE_FILE}: bad", "cannot open 5d41402abc4b2a76b9719d911017c592.svs: bad"),
        (
            "[Errno 2] No such file or directory: '/tmp/w/x.tif'",
            "[Errno 2] No such file or directory: 'x.tif'",
        ),
        ("in .wsi/cache/tiler/a.svs (relative)", "in a.svs (relative)"),
        ("in ~/.wsi/cache/b.svs", "in b.svs"),
        # Not local paths: left alone
        ("object s3://wsi-uploads/case-12/s1.svs", "object s3://wsi-uploads/case-12/s1.svs"),
        (
            "at http://127.0.0.1:9000/wsi-uploads/case-12/s1.svs",
            "at http://127.0.0.1:9000/wsi-uploads/case-12/s1.svs",
        ),
        ("upload case-12/s1.svs at 0.5 um/px, shard 3/12", "upload case-12/s1.svs at 0.5 um/px, shard 3/12"),
    ],
)
def test_local_paths_become_file_names(text: str, public: str) -> None:
    assert scrub_local_paths(text) == public


def test_a_known_download_becomes_its_object_key() -> None:
    name = Path(CACHE_FILE).name
    reason = f"OpenSlide cannot open {CACHE_FILE} ({name} is truncated)"
    known = {CACHE_FILE: "case-12/s1.svs", name: "case-12/s1.svs"}
    assert (
        scrub_local_paths(reason, known)
        == "OpenSlide cannot open case-12/s1.svs (case-12/s1.svs is truncated)"
    )


def test_permanent_errors_carry_no_local_path() -> None:
    error = PermanentError("unopenable", f"cannot read {CACHE_FILE}: Bogus marker length")
    assert (
        error.reason == str(error) == "cannot read 5d41402abc4b2a76b9719d911017c592.svs: Bogus marker length"
    )


def test_dead_letters_and_the_public_failure_quote_no_local_path() -> None:
    slide_id = "5d41402abc4b2a76b9719d911017c592"
    event = pb.SlideIngested(meta=new_meta(service="ingest", slide_id=slide_id, event_parts=["t"]))
    message = Incoming(
        topic=SLIDES_INGESTED,
        partition=0,
        offset=7,
        key=slide_id.encode(),
        value=event.SerializeToString(),
        headers=[],
        event=event,
        attempt=3,
    )
    error = FileNotFoundError(2, "No such file or directory", CACHE_FILE)
    outputs = {out.topic: out.message for out in dead_letter_outputs("tiler", "tiler", message, error, 3)}
    letter, failed = outputs[DEADLETTER], outputs[SLIDES_FAILED]
    assert isinstance(letter, pb.DeadLetter) and isinstance(failed, pb.SlideFailed)
    for text in (letter.error, failed.reason):
        assert ".wsi" not in text and "/srv/lab" not in text, text
        assert "5d41402abc4b2a76b9719d911017c592.svs" in text  # still says which file


def test_the_reader_names_a_bad_file_by_its_name_only(tmp_path: Path, fixtures_dir: Path) -> None:
    from wsitk.shared.slides.reader import SlideRejected, inspect_slide

    cache = tmp_path / ".wsi" / "cache" / "ingest"
    cache.mkdir(parents=True)
    for name in ("unopenable.tiff", "unreadable.svs"):
        (cache / name).symlink_to(fixtures_dir / name)  # the real corrupt scans, under a cache path
        with pytest.raises(SlideRejected) as rejected:
            inspect_slide(cache / name, max_pixels=10**10, min_side_px=1)
        assert str(tmp_path) not in rejected.value.reason and ".wsi" not in rejected.value.reason
        assert name in rejected.value.reason
