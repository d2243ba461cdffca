DROP TABLE image.reconcile_sweeps;
ALTER TABLE image.images DROP COLUMN original_seen, DROP COLUMN swept;
