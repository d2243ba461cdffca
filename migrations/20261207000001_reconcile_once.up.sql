-- The reconciler asks S3 about an image a small, fixed number of times in its life
-- (docs/architecture.md, "Failure handling"): once at its token's expiry, once soon after its
-- upload began, and once after each time Valkey may have lost data (`swept`); it never looks
-- for an original it has seen already (`original_seen`).
ALTER TABLE image.images
    ADD COLUMN original_seen BOOLEAN NOT NULL DEFAULT false,
    ADD COLUMN swept BOOLEAN NOT NULL DEFAULT false;

-- The last time the reconciler swept every pending image (after Valkey may have lost data):
-- instances that notice the same loss sweep once between them.
CREATE TABLE image.reconcile_sweeps (
    singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    swept_at TIMESTAMPTZ NOT NULL
);
INSERT INTO image.reconcile_sweeps (swept_at) VALUES (now());
