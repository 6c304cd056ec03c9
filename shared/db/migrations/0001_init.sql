-- WSI Toolkit schema, version 1. Applied by `wsi db migrate` under the owner role.
-- Pipeline state is written by the recorder only; the operational tables at the end are the
-- services' own small records (durable attempt counts, the bucket poller, the scorer's state).

CREATE SCHEMA IF NOT EXISTS wsi;
SET search_path = wsi, public;

CREATE TABLE slides (
    slide_id          text PRIMARY KEY,
    status            text NOT NULL,
    reason_code       text,
    status_reason     text,
    stage             text,
    vendor            text,
    width             bigint,
    height            bigint,
    mpp               double precision,
    mpp_source        text,
    objective_power   double precision,
    metadata          jsonb,
    profile_id        text,
    profile           jsonb,
    tiling_run_id     text,
    shards_planned    integer,
    total_tiles       integer,
    tissue_area_mm2   double precision,
    file_size         bigint,
    source_sha256     text,
    first_seen_at     timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz
);
CREATE INDEX slides_status_idx ON slides (status, updated_at);

-- Every upload key a slide came from (the same content under two keys is one slide).
CREATE TABLE slide_sources (
    bucket            text NOT NULL,
    upload_key        text NOT NULL,
    etag              text NOT NULL DEFAULT '',
    version_id        text NOT NULL DEFAULT '',
    slide_id          text NOT NULL,
    first_seen_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bucket, upload_key, etag)
);
CREATE INDEX slide_sources_slide_idx ON slide_sources (slide_id);

CREATE TABLE stage_progress (
    slide_id          text NOT NULL,
    tiling_run_id     text NOT NULL,
    stage             text NOT NULL,
    shard_id          text NOT NULL,
    event_id          text NOT NULL,
    detail            jsonb,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slide_id, tiling_run_id, stage, shard_id)
);

CREATE TABLE qc_summaries (
    slide_id           text NOT NULL,
    tiling_run_id      text NOT NULL,
    shard_id           text NOT NULL,
    tile_count         integer NOT NULL,
    accepted_count     integer NOT NULL,
    rejected_by_reason jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (slide_id, tiling_run_id, shard_id)
);

CREATE TABLE predictions (
    prediction_id     text PRIMARY KEY,
    slide_id          text NOT NULL,
    tiling_run_id     text NOT NULL,
    model_version     text NOT NULL,
    backbone_id       text NOT NULL,
    label             text NOT NULL,
    probability       double precision NOT NULL,
    threshold         double precision NOT NULL,
    scores            jsonb NOT NULL DEFAULT '{}',
    tiles_scored      integer NOT NULL,
    tiles_total       integer NOT NULL,
    top_tiles         jsonb NOT NULL DEFAULT '[]',
    attention_ref     jsonb,
    event_id          text NOT NULL,
    produced_at       timestamptz,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (slide_id, tiling_run_id, model_version)
);
CREATE INDEX predictions_slide_idx ON predictions (slide_id);
CREATE INDEX predictions_model_idx ON predictions (model_version);

-- One row per distinct event id; redeliveries raise `deliveries` instead of adding rows.
CREATE TABLE audit_log (
    event_id          text PRIMARY KEY,
    topic             text NOT NULL,
    event_type        text NOT NULL,
    slide_id          text NOT NULL,
    producer          text,
    deliveries        integer NOT NULL DEFAULT 1,
    first_seen_at     timestamptz NOT NULL DEFAULT now(),
    last_seen_at      timestamptz NOT NULL DEFAULT now(),
    summary           jsonb
);
CREATE INDEX audit_log_slide_idx ON audit_log (slide_id, first_seen_at);

CREATE TABLE dead_letters (
    event_id          text PRIMARY KEY,
    slide_id          text NOT NULL,
    service           text NOT NULL,
    source_topic      text NOT NULL,
    source_partition  integer NOT NULL,
    source_offset     bigint NOT NULL,
    error_type        text NOT NULL,
    error             text NOT NULL,
    attempts          integer NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    redriven_at       timestamptz
);

-- Operational records of the services themselves --------------------------------------------

-- Durable attempt counts: incremented *before* a message is handled, so a message whose handling
-- kills the process is recognised as poison after the restart.
CREATE TABLE delivery_attempts (
    consumer_group    text NOT NULL,
    topic             text NOT NULL,
    partition         integer NOT NULL,
    "offset"          bigint NOT NULL,
    attempts          integer NOT NULL DEFAULT 0,
    last_error        text,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition, "offset")
);

-- The ingest bucket poller's memory of objects it has announced.
CREATE TABLE poller_seen_objects (
    bucket            text NOT NULL,
    object_key        text NOT NULL,
    etag              text NOT NULL,
    seen_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bucket, object_key, etag)
);

-- The mil-scorer's per-slide state, keyed by slide and tiling run (recoverable after any crash).
CREATE TABLE scorer_plans (
    slide_id          text NOT NULL,
    tiling_run_id     text NOT NULL,
    plan              bytea NOT NULL,
    shards_planned    integer NOT NULL,
    received_at       timestamptz NOT NULL DEFAULT now(),
    scored_at         timestamptz,
    PRIMARY KEY (slide_id, tiling_run_id)
);
CREATE TABLE scorer_shards (
    slide_id          text NOT NULL,
    tiling_run_id     text NOT NULL,
    shard_id          text NOT NULL,
    embedding         bytea NOT NULL,
    received_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slide_id, tiling_run_id, shard_id)
);

-- Stable views for people who query instead of consume (documented in docs/design.md) -------

CREATE VIEW v_slide_status AS
SELECT s.slide_id,
       s.status,
       s.reason_code,
       s.status_reason,
       s.stage,
       (SELECT array_agg(DISTINCT src.upload_key) FROM slide_sources src WHERE src.slide_id = s.slide_id)
           AS upload_keys,
       s.total_tiles,
       s.tissue_area_mm2,
       s.first_seen_at,
       s.updated_at,
       s.finished_at
FROM slides s;

CREATE VIEW v_predictions AS
SELECT p.prediction_id, p.slide_id, p.model_version, p.backbone_id, p.label, p.probability, p.threshold,
       p.tiles_scored, p.tiles_total, p.tiling_run_id, p.produced_at, p.recorded_at
FROM predictions p;

CREATE VIEW v_model_versions AS
SELECT model_version, backbone_id, count(*) AS predictions, min(recorded_at) AS first_used,
       max(recorded_at) AS last_used
FROM predictions
GROUP BY model_version, backbone_id;
