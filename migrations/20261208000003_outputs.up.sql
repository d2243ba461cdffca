-- Every stored file of a processed image (role, content type, size, bytes: a JSON array as the
-- result's `files` field), and the privacy manifest: the kinds of metadata the upload carried,
-- all stripped (names, never values).
ALTER TABLE image.images
    ADD COLUMN files JSONB CHECK (jsonb_typeof(files) = 'array'),
    ADD COLUMN stripped_metadata TEXT[];
