-- HEIC/HEIF photos (what phones write) are accepted beside JPEG, PNG and WebP.
ALTER TABLE image.images DROP CONSTRAINT images_content_type_check;
ALTER TABLE image.images ADD CONSTRAINT images_content_type_check
    CHECK (content_type IN ('image/jpeg', 'image/png', 'image/webp', 'image/heic', 'image/heif'));
