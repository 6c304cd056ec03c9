-- What a lab needs to correct a slide: a per-slide MPP that wins over the file's own, and the runs
-- of a slide with other profiles (`wsi reprocess`) beside the first one.
SET search_path = wsi, public;

-- Per-slide MPP overrides (`wsi mpp set`, one row per reference). Ingest looks a new slide up by its
-- content slide id, a slide id prefix (8+ hex digits), its upload key or the upload's file name, and
-- pins the value in the profile (PipelineProfile.slide_mpp_override).
CREATE TABLE slide_mpp_overrides (
    slide_ref         text PRIMARY KEY,
    mpp               double precision NOT NULL CHECK (mpp >= 0.05 AND mpp <= 20),
    reason            text NOT NULL DEFAULT '',
    set_by            text NOT NULL,
    set_at            timestamptz NOT NULL DEFAULT now()
);

-- Every tiling run (slide + profile) the recorder has seen, in order of first appearance: the upload's
-- run, then one per `wsi reprocess` (or re-ingest under another profile). The newest is the slide's
-- current run (slides.tiling_run_id): its events drive the slide's status; older runs keep their rows
-- (progress, QC summaries, predictions) without moving the status.
CREATE TABLE slide_runs (
    slide_id          text NOT NULL,
    tiling_run_id     text NOT NULL,
    profile_id        text,
    profile           jsonb,
    origin            text NOT NULL DEFAULT 'upload',   -- upload, reprocess
    reason            text NOT NULL DEFAULT '',
    started_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slide_id, tiling_run_id)
);

-- When the current run started (a reprocessed slide's deadline counts from here, not first_seen_at).
ALTER TABLE slides ADD COLUMN run_started_at timestamptz;

-- Runs of slides recorded before this migration: the pinned profile's run, then any other run that
-- left rows behind (its profile unknown here).
INSERT INTO slide_runs (slide_id, tiling_run_id, profile_id, profile, started_at)
SELECT slide_id, left(slide_id, 16) || '-' || profile_id, profile_id, profile, first_seen_at
FROM slides WHERE profile_id IS NOT NULL
ON CONFLICT DO NOTHING;
INSERT INTO slide_runs (slide_id, tiling_run_id, started_at)
SELECT slide_id, tiling_run_id, min(at) FROM (
    SELECT slide_id, tiling_run_id, recorded_at AS at FROM stage_progress
    UNION ALL
    SELECT slide_id, tiling_run_id, recorded_at FROM predictions
) seen
GROUP BY slide_id, tiling_run_id
ON CONFLICT DO NOTHING;
UPDATE slides SET tiling_run_id = left(slide_id, 16) || '-' || profile_id
WHERE tiling_run_id IS NULL AND profile_id IS NOT NULL;

-- v_slide_status gains (at the end, so existing readers are unaffected) the current run, the number
-- of runs and the MPP the slide is processed at with its source.
CREATE OR REPLACE VIEW v_slide_status AS
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
       s.finished_at,
       s.profile_id,
       s.tiling_run_id,
       (SELECT count(*) FROM slide_runs r WHERE r.slide_id = s.slide_id) AS runs,
       s.mpp,
       s.mpp_source
FROM slides s;
