-- Back to JPEG, PNG and WebP for new images; HEIC images already declared stay (NOT VALID).
ALTER TABLE image.images DROP CONSTRAINT images_content_type_check;
ALTER TABLE image.images ADD CONSTRAINT images_content_type_check
    CHECK (content_type IN ('image/jpeg', 'image/png', 'image/webp')) NOT VALID;
