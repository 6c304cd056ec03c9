-- The model registry: one row per registered MIL model version, its artifacts in the object store,
-- and at most one active version, which the ingest service pins on new slides and the mil-scorer uses.
SET search_path = wsi, public;

CREATE TABLE model_versions (
    model_version     text PRIMARY KEY,
    architecture      jsonb NOT NULL,            -- name + hyper-parameters (an ensemble lists its members)
    backbone_id       text NOT NULL,             -- the tile encoder whose embeddings it was trained on
    in_dim            integer NOT NULL,
    profile           jsonb NOT NULL DEFAULT '{}', -- what it expects of a slide: target_mpp, tile_size, stain_method
    threshold         double precision NOT NULL, -- chosen on validation data only
    artifact_bucket   text NOT NULL,
    artifact_key      text NOT NULL,             -- the ONNX file
    artifact_sha256   text NOT NULL,
    artifact_size     bigint NOT NULL,
    card_key          text,                      -- model card (JSON) beside it
    training          jsonb NOT NULL DEFAULT '{}', -- data summary, protocol, per-fold validation
    metrics           jsonb NOT NULL DEFAULT '{}', -- held-out test metrics with confidence intervals
    created_by        text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    status            text NOT NULL DEFAULT 'registered'
                      CHECK (status IN ('registered', 'active', 'retired')),
    promoted_at       timestamptz,
    promoted_by       text
);
-- At most one active version, enforced by the database.
CREATE UNIQUE INDEX model_versions_one_active ON model_versions ((true)) WHERE status = 'active';

CREATE TABLE model_events (
    id                bigserial PRIMARY KEY,
    model_version     text NOT NULL REFERENCES model_versions (model_version),
    action            text NOT NULL,             -- registered, promoted, demoted, retired
    actor             text NOT NULL,
    at                timestamptz NOT NULL DEFAULT now(),
    detail            jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX model_events_version_idx ON model_events (model_version, at);

-- Which path produced a prediction: the live stream, or `wsi rescore` from stored embeddings.
ALTER TABLE predictions ADD COLUMN origin text NOT NULL DEFAULT 'stream';
ALTER TABLE predictions ADD COLUMN heatmap_ref jsonb;
ALTER TABLE predictions ADD COLUMN top_tiles_ref jsonb;

DROP VIEW v_model_versions;
CREATE VIEW v_model_versions AS
SELECT v.model_version, v.status, v.backbone_id, v.architecture ->> 'name' AS architecture, v.threshold,
       (v.metrics #>> '{test,metrics,auc,point}')::double precision AS test_auc, v.created_by, v.created_at, v.promoted_at,
       coalesce(p.predictions, 0) AS predictions, p.first_used, p.last_used
FROM model_versions v
LEFT JOIN (SELECT model_version, count(*) AS predictions, min(recorded_at) AS first_used,
                  max(recorded_at) AS last_used
           FROM predictions GROUP BY model_version) p USING (model_version)
UNION ALL
-- versions that made predictions without being registered (the shipped default model)
SELECT p.model_version, 'unregistered', p.backbone_id, NULL, NULL, NULL, NULL, NULL, NULL,
       count(*), min(p.recorded_at), max(p.recorded_at)
FROM predictions p
WHERE NOT EXISTS (SELECT 1 FROM model_versions v WHERE v.model_version = p.model_version)
GROUP BY p.model_version, p.backbone_id;

DROP VIEW v_predictions;
CREATE VIEW v_predictions AS
SELECT p.prediction_id, p.slide_id, p.model_version, p.backbone_id, p.label, p.probability, p.threshold,
       p.tiles_scored, p.tiles_total, p.tiling_run_id, p.produced_at, p.recorded_at, p.origin
FROM predictions p;
