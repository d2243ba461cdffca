//! The colours a file declares (an embedded ICC profile, or a HEIF file's code points)
//! converted to sRGB.

use std::sync::LazyLock;

use image::DynamicImage;

/// Where a file says its pixels' colours are defined, when that may not be sRGB.
#[derive(Debug, Clone)]
pub enum Colours {
    /// An embedded ICC profile.
    Icc(Vec<u8>),
    /// Code points (ITU-T H.273) for primaries and transfer, as a HEIF `nclx` box gives them.
    Cicp(moxcms::CicpProfile),
}

impl Colours {
    fn profile(&self) -> Result<moxcms::ColorProfile, String> {
        match self {
            Self::Icc(bytes) => {
                moxcms::ColorProfile::new_from_slice(bytes).map_err(|e| e.to_string())
            }
            Self::Cicp(cicp) => {
                // The curves say whether the code points were understood (moxcms'
                // `update_rgb_colorimetry_from_cicp` answers `false` either way).
                let profile = moxcms::ColorProfile::new_from_cicp(*cicp);
                match profile.red_trc {
                    Some(_) => Ok(profile),
                    None => Err(format!("no colorimetry for {cicp:?}")),
                }
            }
        }
    }
}

/// Converts 8-bit RGB(A) pixels from the `colours` a file declares (a phone's Display P3,
/// Adobe RGB) to sRGB, as libvips' `thumbnail` does with `export_profile=srgb`; run on the
/// resized image, so it costs a fraction of the decode. moxcms in floating point: its
/// fixed-point path and qcms round a few per cent of samples off by one, noise that costs
/// 0.1–0.15 % more JPEG bytes than libvips' Little CMS (`./dev bench gateway`). Colours that
/// cannot be read or converted (or grey pixels) leave the pixels as they are: they are then
/// taken as sRGB.
pub fn to_srgb(image: &mut DynamicImage, colours: &Colours) {
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
    let transform = colours.profile().and_then(|profile| {
        profile
            .create_transform_8bit(layout, &SRGB, layout, options)
            .map_err(|e| e.to_string())
    });
    let transform = match transform {
        Ok(transform) => transform,
        Err(e) => {
            return tracing::debug!(error = %e, "colours not usable; pixels taken as sRGB");
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
