"""``wsi dicomweb pull URL STUDY_UID``: a study's slide series from a DICOMweb archive into the pipeline.

The archive is asked (QIDO-RS) for the study's series of modality SM, and each series' instances are
retrieved (WADO-RS, ``dicomweb-client``) and uploaded into the watched bucket under
``<prefix>/<study>/<series>/<SOP instance>.dcm``, with the UIDs in the key pseudonymised when
``WSI_DICOM_UID_KEY`` is set (the upload key travels in events). From there ingest groups them like any
uploaded series (``services/ingest/multifile.py``): nothing else in the pipeline knows the slide came from
DICOMweb. Instances already in the bucket under the same key are skipped, so a pull can be repeated.
One instance is held in memory at a time (a pyramid level of a large scan can be a few hundred MB).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `wsi --help` builds this command's parser: nothing heavy at import
    from wsitk.shared.objectstore import ObjectStore

_SERIES_UID, _SOP_UID, _SOP_CLASS = "0020000E", "00080018", "00080016"


def _value(attributes: dict[str, Any], tag: str) -> str:
    values = attributes.get(tag, {}).get("Value", [])
    return str(values[0]) if values else ""


def pull_study(
    client: Any,
    store: ObjectStore,
    bucket: str,
    study_uid: str,
    *,
    prefix: str = "dicomweb",
    uid_key: str = "",
) -> list[str]:
    """Upload the study's whole-slide instances into ``bucket``; returns the keys written (module docstring)."""
    from wsitk.shared.slides.dicom import WSI_SOP_CLASS, pseudonymise_uid

    written = []
    folder_study = pseudonymise_uid(study_uid, uid_key)
    for series in client.search_for_series(study_instance_uid=study_uid, search_filters={"Modality": "SM"}):
        series_uid = _value(series, _SERIES_UID)
        folder = f"{prefix}/{folder_study}/{pseudonymise_uid(series_uid, uid_key)}"
        for instance in client.search_for_instances(
            study_instance_uid=study_uid, series_instance_uid=series_uid
        ):
            sop_uid = _value(instance, _SOP_UID)
            sop_class = _value(instance, _SOP_CLASS)
            if sop_class and sop_class != WSI_SOP_CLASS:
                continue
            key = f"{folder}/{pseudonymise_uid(sop_uid, uid_key)}.dcm"
            if store.stat(bucket, key) is not None:
                continue
            dataset = client.retrieve_instance(  # as stored: no transcoding of the JPEG frames
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                sop_instance_uid=sop_uid,
                media_types=(("application/dicom", "*"),),
            )
            buffer = io.BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            store.put_if_absent(bucket, key, buffer.getvalue(), "application/dicom")
            written.append(key)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", choices=["pull"], help="pull: a study's slide series into the uploads bucket"
    )
    parser.add_argument("url", help="the archive's DICOMweb base URL, e.g. https://pacs.example/dicom-web")
    parser.add_argument("study", help="Study Instance UID")
    parser.add_argument(
        "--prefix", default="dicomweb", help="folder in the uploads bucket (default: dicomweb)"
    )
    parser.add_argument("--token", default="", help="bearer token for the archive (or WSI_DICOMWEB_TOKEN)")


def cli_dicomweb(args: argparse.Namespace) -> int:
    import os

    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session
    from requests import RequestException
    from wsitk.shared.config import load_settings
    from wsitk.shared.objectstore import open_store

    settings = load_settings()
    session = create_session()
    token = args.token or os.environ.get("WSI_DICOMWEB_TOKEN", "")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    client = DICOMwebClient(url=args.url, session=session)
    try:
        keys = pull_study(
            client,
            open_store(settings),
            settings.uploads_bucket,
            args.study,
            prefix=args.prefix,
            uid_key=settings.dicom_uid_secret(),
        )
    except RequestException as error:
        print(
            f"wsi dicomweb pull: the archive at {args.url} did not answer as DICOMweb: {error}",
            file=sys.stderr,
        )
        return 2
    print(json.dumps({"study": args.study, "uploaded": len(keys), "keys": keys}))
    if not keys:
        print("wsi dicomweb pull: no new slide instances (modality SM) in that study", file=sys.stderr)
    return 0
