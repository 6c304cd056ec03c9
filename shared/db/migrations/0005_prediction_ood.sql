-- Out-of-distribution flags on predictions (shared/models/ood.py, docs/training-and-evaluation.md): how far
-- the slide's tile embeddings lie from the model's training embeddings, the percentile of that score among
-- the model's validation slides, the model's limit, and whether the slide is beyond it. NULL: predictions
-- made before this existed, or by a model without a training summary (not assessed).
SET search_path = wsi, public;

ALTER TABLE predictions
    ADD COLUMN ood_score           double precision,
    ADD COLUMN ood_percentile      double precision,
    ADD COLUMN ood_limit           double precision,
    ADD COLUMN out_of_distribution boolean;

CREATE INDEX predictions_out_of_distribution ON predictions (recorded_at) WHERE out_of_distribution;

-- v_predictions gains the flag at the end (existing readers are unaffected).
CREATE OR REPLACE VIEW v_predictions AS
SELECT p.prediction_id, p.slide_id, p.model_version, p.backbone_id, p.label, p.probability, p.threshold,
       p.tiles_scored, p.tiles_total, p.tiling_run_id, p.produced_at, p.recorded_at, p.origin,
       p.out_of_distribution, p.ood_score, p.ood_percentile, p.ood_limit
FROM predictions p;
