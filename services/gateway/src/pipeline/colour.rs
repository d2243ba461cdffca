//! An embedded ICC profile's colours converted to sRGB.

use std::sync::LazyLock;

use image::DynamicImage;

/// Converts 8-bit RGB(A) pixels from an embedded ICC profile (a phone's Display P3, Adobe RGB)
/// to sRGB, as libvips' `thumbnail` does with `export_profile=srgb`; run on the resized image,
/// so it costs a fraction of the decode. moxcms in floating point: its fixed-point path and
/// qcms round a few per cent of samples off by one, noise that costs 0.1–0.15 % more JPEG bytes
/// than libvips' Little CMS (`./dev bench gateway`). A profile that cannot be read or converted
/// (or grey pixels) leaves the pixels as they are: they are then taken as sRGB.
pub fn to_srgb(image: &mut DynamicImage, icc_profile: &[u8]) {
    let (layout, row, pixels): (_, _, &mut [u8]) = match image {
        DynamicImage::ImageRgb8(rgb) => (moxcms::Layout::Rgb, rgb.width() as usize * 3, rgb),
        DynamicImage::ImageRgba8(rgba) => (moxcms::Layout::Rgba, rgba.width() as usize * 4, rgba),
        _ => return,
    };
    if row == 0 {
        return;
    }
    let options = moxcms::TransformOptions {
        prefer_fixed_point: false,
        ..moxcms::TransformOptions::default()
    };
    let transform = moxcms::ColorProfile::new_from_slice(icc_profile)
        .and_then(|profile| profile.create_transform_8bit(layout, &SRGB, layout, options));
    let transform = match transform {
        Ok(transform) => transform,
        Err(e) => {
            return tracing::debug!(error = %e, "ICC profile not usable; pixels taken as sRGB");
        }
    };
    // moxcms converts from one buffer into another: one row at a time through a copy.
    let mut source = vec![0; row];
    for line in pixels.chunks_exact_mut(row) {
        source.copy_from_slice(line);
        if let Err(e) = transform.transform(&source, line) {
            return tracing::debug!(error = %e, "ICC conversion failed; pixels taken as sRGB");
        }
    }
}

/// The sRGB profile colours are converted to.
static SRGB: LazyLock<moxcms::ColorProfile> = LazyLock::new(moxcms::ColorProfile::new_srgb);
