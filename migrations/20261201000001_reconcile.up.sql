-- The reconciler (ARCHITECTURE.md, "Durability"): when a PENDING image is next looked at in S3
-- for a result record or an original that Valkey may have lost. New images wait a minute first.
ALTER TABLE image.images
    ADD COLUMN next_check_at TIMESTAMPTZ NOT NULL DEFAULT now() + interval '1 minute';

CREATE INDEX images_pending_by_check ON image.images (next_check_at) WHERE status = 'PENDING';
