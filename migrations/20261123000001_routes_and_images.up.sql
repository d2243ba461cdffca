-- Routes, their waypoints, and the images uploaded for them (ARCHITECTURE.md).
-- Markers are normalized (0.0–1.0) and stored as given: DOUBLE PRECISION, never rounded.

CREATE SCHEMA route;
CREATE SCHEMA image;

CREATE TYPE route.route_status AS ENUM ('PENDING', 'READY', 'PUBLISHED');
CREATE TYPE route.waypoint_status AS ENUM ('PENDING', 'CONFIRMED', 'FAILED');
CREATE TYPE image.image_status AS ENUM ('PENDING', 'PROCESSED', 'FAILED', 'EXPIRED');

CREATE TABLE route.routes (
    id           UUID PRIMARY KEY,
    owner        TEXT NOT NULL CHECK (length(owner) BETWEEN 1 AND 256),
    name         TEXT NOT NULL CHECK (length(name) <= 200),
    status       route.route_status NOT NULL DEFAULT 'PENDING',
    -- Client-generated; a retry with the same value returns the same route.
    request_id   TEXT NOT NULL CHECK (length(request_id) BETWEEN 1 AND 128),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at TIMESTAMPTZ,
    UNIQUE (owner, request_id),
    CHECK ((status = 'PUBLISHED') = (published_at IS NOT NULL))
);

-- ListRoutes: the owner's routes, newest first, keyset-paginated on (created_at, id).
CREATE INDEX routes_owner_newest ON route.routes (owner, created_at DESC, id DESC);

CREATE TABLE route.waypoints (
    id               UUID PRIMARY KEY,
    route_id         UUID NOT NULL REFERENCES route.routes (id) ON DELETE CASCADE,
    position         INTEGER NOT NULL CHECK (position BETWEEN 0 AND 99),
    marker_x         DOUBLE PRECISION NOT NULL CHECK (marker_x >= 0.0 AND marker_x <= 1.0),
    marker_y         DOUBLE PRECISION NOT NULL CHECK (marker_y >= 0.0 AND marker_y <= 1.0),
    status           route.waypoint_status NOT NULL DEFAULT 'PENDING',
    -- The newest image issued for this waypoint (older ones stay in image.images for history).
    current_image_id UUID,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (route_id, position)
);

CREATE TABLE image.images (
    id               UUID PRIMARY KEY,
    route_id         UUID NOT NULL REFERENCES route.routes (id) ON DELETE CASCADE,
    waypoint_id      UUID NOT NULL REFERENCES route.waypoints (id) ON DELETE CASCADE,
    status           image.image_status NOT NULL DEFAULT 'PENDING',
    content_type     TEXT NOT NULL CHECK (content_type IN ('image/jpeg', 'image/png', 'image/webp')),
    -- The most bytes the upload may have (the token's max_file_size).
    declared_size    BIGINT NOT NULL CHECK (declared_size > 0),
    storage_key      TEXT NOT NULL UNIQUE,
    preview_key      TEXT,
    sha256           TEXT CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    width            INTEGER CHECK (width > 0),
    height           INTEGER CHECK (height > 0),
    processed_width  INTEGER CHECK (processed_width > 0),
    processed_height INTEGER CHECK (processed_height > 0),
    byte_size        BIGINT CHECK (byte_size > 0),
    error_code       TEXT,
    error_message    TEXT,
    -- When the upload token expires: a still PENDING image then becomes EXPIRED.
    expires_at       TIMESTAMPTZ NOT NULL,
    -- The `image:result` entry that finalized the image. Results are applied only to PENDING
    -- images, so a redelivered or duplicated result changes nothing; this records which won.
    result_entry_id  TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (status <> 'PROCESSED' OR (sha256 IS NOT NULL AND preview_key IS NOT NULL
        AND width IS NOT NULL AND height IS NOT NULL AND processed_width IS NOT NULL
        AND processed_height IS NOT NULL AND byte_size IS NOT NULL)),
    CHECK (status NOT IN ('FAILED', 'EXPIRED') OR error_code IS NOT NULL)
);

CREATE INDEX images_waypoint ON image.images (waypoint_id);
-- The expiry job scans only pending images, oldest deadline first.
CREATE INDEX images_pending_by_expiry ON image.images (expires_at) WHERE status = 'PENDING';

-- Waypoint → current image closes a cycle with image → waypoint, so it is checked at commit:
-- one transaction inserts the waypoints and their first images.
ALTER TABLE route.waypoints
    ADD CONSTRAINT waypoints_current_image_fk FOREIGN KEY (current_image_id)
    REFERENCES image.images (id) DEFERRABLE INITIALLY DEFERRED;
