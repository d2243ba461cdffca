ALTER TABLE image.images DROP COLUMN thumbhash;
