"""After the local broker restarts (it keeps everything in memory, so every topic comes back empty),
the services reconnect by themselves and the reconciler re-drives every unfinished slide from what
PostgreSQL and the object store kept: no slide is stranded, none is predicted twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from wsitk.shared.stack import LocalStack, start_component, stop_component

from tests.conftest import Pipeline, pipeline_env
from tests.e2e.test_e2e_pipeline import all_terminal, make_slides

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def restart_pipeline(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    home = tmp_path_factory.mktemp("wsi-restart")
    with LocalStack() as stack:
        # Reconcile every 10 s, re-announcing slides without progress for 10 s.
        env = pipeline_env(stack, tiny_models, home, WSI_RECONCILE_INTERVAL_S="10")
        p = Pipeline(stack=stack, home=home, env=env)
        p.start()
        try:
            yield p
        finally:
            p.stop()


def test_unfinished_slides_complete_after_the_broker_forgets_everything(
    restart_pipeline: Pipeline, tmp_path: Path
) -> None:
    p = restart_pipeline
    keys = []
    for path in make_slides(tmp_path, 2, seed=400):
        key = f"restart/{path.name}"
        p.upload(path, key)
        keys.append(key)
    # Let the pipeline start on them, then take the broker away mid-flight.
    p.wait_for(lambda: len(p.statuses(keys)) == len(keys), 120, "both slides to be ingested")
    stop_component(p.stack.state_dir, "broker")
    unfinished = [k for k, status in p.statuses(keys).items() if status != "predicted"]
    assert unfinished, "the broker went away too late to strand anything; the test proves nothing"
    time.sleep(3)
    start_component(p.stack.state_dir, "broker")  # empty: topics re-created from the table, no events

    p.wait_for(lambda: all_terminal(p, keys), 300, "both slides to reach an outcome after the broker restart")
    assert set(p.statuses(keys).values()) == {"predicted"}
    rows: list[Any] = p.query(
        "SELECT src.upload_key, count(pr.*) FROM slide_sources src LEFT JOIN predictions pr USING (slide_id) "
        "WHERE src.upload_key = ANY(%s) GROUP BY src.upload_key",
        (keys,),
    )
    assert dict(rows) == dict.fromkeys(keys, 1)
    assert all(pid for pid in p.pids().values()), "a service died during the broker outage"
    assert "reconciler re-announced" in (p.home / "logs" / "ingest.log").read_text()
