-- A ThumbHash of each processed image's preview: the placeholder clients paint before it loads.
ALTER TABLE image.images ADD COLUMN thumbhash BYTEA;
