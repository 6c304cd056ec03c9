"""`wsi dicomweb pull` against a real DICOMweb archive: Debian's Orthanc with its DICOMweb plugin, started
by the test on loopback. A generated whole-slide series is stored in the archive, pulled study by study
into a bucket, and arrives byte-identical in its pixel data and complete by ingest's rule."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from wsitk.services.ingest.multifile import Part, missing_parts
from wsitk.shared.interop.dicomweb import pull_study
from wsitk.shared.objectstore import FilesystemObjectStore
from wsitk.shared.slides.dicom import describe_instance, pseudonymise_uid
from wsitk.shared.slides.synth import SynthSpec, generate_slide

from tests.dicom_wsi import DicomSeries, write_dicom_series

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    if binary is None or not PLUGIN.is_file():
        pytest.fail("Debian's orthanc and orthanc-dicomweb are needed: run `make system-deps`")
    home = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {
        "Name": "wsi-test-archive",
        "StorageDirectory": str(home / "db"),
        "IndexDirectory": str(home / "db"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "Plugins": [str(PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (home / "orthanc.json").write_text(json.dumps(config))
    log = (home / "orthanc.log").open("w")
    process = subprocess.Popen([binary, str(home / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    import requests

    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{url}/system", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail(f"Orthanc did not start: {(home / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def stored_series(orthanc: str, tmp_path_factory: pytest.TempPathFactory) -> DicomSeries:
    import requests

    work = tmp_path_factory.mktemp("dicomweb-series")
    svs = work / "source.svs"
    generate_slide(svs, SynthSpec(width=1200, height=1000, mpp=0.5, fmt="svs", seed=31, tumour_fraction=0.2))
    series = write_dicom_series(svs, work / "series", base_parts=2)
    for path in series.files:
        stored = requests.post(f"{orthanc}/instances", data=path.read_bytes(), timeout=30)
        assert stored.ok, stored.text
    return series


def test_a_study_pulled_over_dicomweb_arrives_complete_and_unchanged(
    orthanc: str, stored_series: DicomSeries, tmp_path: Path
) -> None:
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=f"{orthanc}/dicom-web")
    store = FilesystemObjectStore(tmp_path / "s3")
    store.ensure_bucket("uploads")
    keys = pull_study(client, store, "uploads", stored_series.study_uid, uid_key="k")
    assert len(keys) == len(stored_series.files) == 4
    folder = f"dicomweb/{pseudonymise_uid(stored_series.study_uid, 'k')}/{pseudonymise_uid(stored_series.series_uid, 'k')}"
    assert all(key.startswith(folder + "/") for key in keys)
    assert stored_series.study_uid not in "".join(keys)  # the key travels in events: pseudonymised UIDs only

    originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in stored_series.files}
    parts = []
    for key in keys:
        path = tmp_path / Path(key).name
        store.download("uploads", key, path)
        pulled = pydicom.dcmread(path)
        original = originals[pulled.SOPInstanceUID]
        assert pulled.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID  # not transcoded
        assert pulled.PixelData == original.PixelData
        info = describe_instance(path)
        assert info is not None
        parts.append(Part(key, "e", path.stat().st_size, "0", info.to_dict()))
    assert missing_parts("dicom", f"dicom:{folder}:{stored_series.series_uid}", parts) == []

    assert pull_study(client, store, "uploads", stored_series.study_uid, uid_key="k") == []  # repeatable
    assert pull_study(client, store, "uploads", "1.2.3.4.5.6.7.8.9") == []  # no such study: nothing
