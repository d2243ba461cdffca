DROP INDEX image.images_pending_by_check;
ALTER TABLE image.images DROP COLUMN next_check_at;
