//! The placeholder a client paints before any image loads: a ThumbHash (a few dozen bytes
//! holding the average colour, the aspect ratio and a few low frequencies), computed from the
//! preview's pixels shrunk to at most 100 × 100, as the algorithm is meant to be fed.

use image::DynamicImage;

/// The ThumbHash of `preview` (sRGB, upright, alpha straight).
pub fn thumbhash(preview: &DynamicImage) -> Vec<u8> {
    let small = preview.thumbnail(100, 100).to_rgba8();
    let (width, height) = (small.width() as usize, small.height() as usize);
    if width == 0 || height == 0 {
        return Vec::new();
    }
    thumbhash::rgba_to_thumb_hash(width, height, small.as_raw())
}
