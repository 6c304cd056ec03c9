-- The viewer's read-only access (docs/viewer.md). A group role without login, wsi_readonly, holds
-- SELECT on what a person looking at slides needs, and nothing else: not the audit log, dead
-- letters, delivery attempts or the scorer's stored embeddings. The viewer's login role (wsi_viewer)
-- is made a member by `wsi db migrate` / `wsi stack up` (wsitk.shared.db.viewer_role), or by the
-- cluster's managed roles on Kubernetes, where the owner may not create roles: then the cluster
-- declares wsi_readonly before this runs.
SET search_path = wsi, public;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'wsi_readonly') THEN
        IF NOT EXISTS (
            SELECT 1 FROM pg_roles WHERE rolname = current_user AND (rolsuper OR rolcreaterole)
        ) THEN
            RAISE NOTICE 'role wsi_readonly is missing and the owner may not create it: the viewer has no grants';
            RETURN;
        END IF;
        CREATE ROLE wsi_readonly NOLOGIN;
    END IF;
    GRANT USAGE ON SCHEMA wsi TO wsi_readonly;
    GRANT SELECT ON slides, slide_sources, slide_runs, predictions, qc_summaries, model_versions
        TO wsi_readonly;
    GRANT SELECT ON v_slide_status, v_predictions, v_model_versions TO wsi_readonly;
END
$$;
