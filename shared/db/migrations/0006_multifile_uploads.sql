-- Multi-file slides (a DICOM whole-slide series, MIRAX's .mrxs plus its data folder): ingest's own record
-- of the files it has seen of each group and of the group's outcome (docs/interoperability.md). One
-- group becomes one slide once complete (services/ingest/multifile.py); the slide itself is recorded
-- by the recorder as any other.
SET search_path = wsi, public;

CREATE TABLE upload_groups (
    bucket            text NOT NULL,
    group_key         text NOT NULL,         -- "dicom:<prefix>:<series uid>" or "mirax:<prefix>/<name>"
    kind              text NOT NULL,         -- "dicom" or "mirax"
    first_seen_at     timestamptz NOT NULL DEFAULT now(),
    last_part_at      timestamptz NOT NULL DEFAULT now(),
    state             text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'ingested', 'rejected')),
    slide_id          text,
    reason            text,
    PRIMARY KEY (bucket, group_key)
);
CREATE INDEX upload_groups_pending ON upload_groups (state, last_part_at) WHERE state = 'pending';

CREATE TABLE upload_group_parts (
    bucket            text NOT NULL,
    group_key         text NOT NULL,
    object_key        text NOT NULL,
    etag              text NOT NULL,
    size              bigint NOT NULL,
    sha256            text NOT NULL,
    detail            jsonb NOT NULL,        -- what the file declares (shared/slides/dicom.py InstanceInfo)
    seen_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bucket, group_key, object_key),
    FOREIGN KEY (bucket, group_key) REFERENCES upload_groups (bucket, group_key)
);
CREATE INDEX upload_group_parts_key ON upload_group_parts (bucket, object_key);
