ALTER TABLE image.images DROP COLUMN files, DROP COLUMN stripped_metadata;
