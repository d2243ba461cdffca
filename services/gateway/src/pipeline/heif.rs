//! HEIF (a phone's HEIC) through libheif: the primary image only (thumbnails, depth maps and
//! other auxiliary images, a burst's other frames are never decoded), a grid's tiles joined,
//! 10-bit pixels brought to 8, the file's `irot`/`imir`/`clap` transforms applied by libheif —
//! and so never the EXIF orientation as well (HEIF says the transforms are what counts; an
//! iPhone writes both) —, the colours as the file declares them (an ICC profile, or `nclx`
//! code points).
//!
//! Limits before any pixel exists: libheif's security limits are set from the pixel limit
//! (image size, tiles, total memory), and the primary image's size is checked on its own
//! after the boxes are read. libheif decodes on the calling thread (tiles one after another,
//! one HEVC thread): the pipeline already runs on a bounded pool.

use std::sync::LazyLock;

use follow_bus::MetadataKind;
use image::{ColorType, metadata::Orientation};
use libheif_rs::{
    AuxiliaryImagesFilter, ColorProfile as _, ColorSpace, DecodingOptions, HeifContext, HeifError,
    HeifErrorSubCode, ImageHandle, LibHeif, RgbChroma, color_profile_types,
};

use super::{Colours, Decoded, decode::max_alloc, from_raw, metadata::Found};
use crate::{error::PipelineError, sniff};

/// libheif, initialised once for the process.
static LIBHEIF: LazyLock<LibHeif> = LazyLock::new(LibHeif::new);

/// The most tiles a grid may have: one per 256 × 256 pixels allowed (a 48 MP photo in 256-pixel
/// tiles has 732; phones write 512-pixel tiles), at least 64. Each tile is a separate HEVC
/// decode, so a grid of thousands of tiny tiles would cost far more than its pixels.
fn max_tiles(max_pixels: u64) -> u64 {
    (max_pixels / (256 * 256)).max(64)
}

/// Decodes a HEIF file's primary image as 8-bit RGB or RGBA, upright.
pub(super) fn decode_heif(bytes: &[u8], max_pixels: u64) -> Result<Decoded, PipelineError> {
    let mut context = HeifContext::new().map_err(cannot_start)?;
    let mut limits = context.security_limits();
    limits.set_max_image_size_pixels(max_pixels);
    limits.set_max_number_of_tiles(max_tiles(max_pixels));
    limits.set_max_total_memory(max_alloc(max_pixels));
    context.set_security_limits(&limits).map_err(cannot_start)?;
    context.set_max_decoding_threads(0);
    context.read_bytes(bytes).map_err(refused)?;
    let handle = context.primary_image_handle().map_err(refused)?;
    let (width, height) = (handle.width(), handle.height());
    sniff::check_dimensions(width.into(), height.into(), max_pixels)?;
    let alpha = handle.has_alpha_channel();
    let mut options = DecodingOptions::new().ok_or(PipelineError::Internal)?;
    options.set_convert_hdr_to_8bit(true);
    options.set_num_codec_threads(1);
    // A tile that cannot be decoded (its bytes cut off) fails the image, as a JPEG that stops
    // early does, instead of being painted over.
    options.set_strict_decoding(true);
    let chroma = if alpha {
        RgbChroma::Rgba
    } else {
        RgbChroma::Rgb
    };
    let decoded = LIBHEIF
        .decode(&handle, ColorSpace::Rgb(chroma), Some(options))
        .map_err(refused)?;
    let plane = decoded
        .planes()
        .interleaved
        .ok_or(PipelineError::Internal)?;
    let (color, channels) = if alpha {
        (ColorType::Rgba8, 4)
    } else {
        (ColorType::Rgb8, 3)
    };
    let row = plane.width as usize * channels;
    if plane.storage_bits_per_pixel as usize != channels * 8 || plane.stride < row {
        tracing::error!(
            bits = plane.storage_bits_per_pixel,
            "libheif gave unexpected pixels"
        );
        return Err(PipelineError::Internal);
    }
    // One copy of each row (libheif pads rows to its stride).
    let mut pixels = Vec::with_capacity(row * plane.height as usize);
    for line in plane.data.chunks(plane.stride).take(plane.height as usize) {
        pixels.extend_from_slice(&line[..row]);
    }
    let image =
        from_raw(color, (plane.width, plane.height), pixels).ok_or(PipelineError::Internal)?;
    Ok(Decoded {
        image,
        orientation: Orientation::NoTransforms,
        colours: colours_of(&handle),
        metadata: metadata_of(&handle),
        width,
        height,
    })
}

/// The metadata the primary image carries: EXIF and XMP items, thumbnails, depth maps and
/// other auxiliary images (not its alpha plane, which is kept).
fn metadata_of(handle: &ImageHandle) -> Vec<MetadataKind> {
    /// More items than any phone writes are not looked at.
    const MAX_ITEMS: usize = 32;
    /// An EXIF item larger than this is not read (see `Found::exif`).
    const MAX_EXIF: usize = 256 * 1024 + 4;
    let mut found = Found::default();
    let mut ids = vec![0; MAX_ITEMS];
    let count = handle.metadata_block_ids(&mut ids, 0);
    for &id in &ids[..count.min(MAX_ITEMS)] {
        match handle.metadata_type(id) {
            Some("Exif") if handle.metadata_size(id) <= MAX_EXIF => {
                // A big-endian offset from its end to the TIFF header, then the EXIF block.
                match handle.metadata(id) {
                    Ok(item) => match item.split_first_chunk::<4>() {
                        Some((offset, rest)) => {
                            let offset = u32::from_be_bytes(*offset) as usize;
                            found.exif(rest.get(offset..).unwrap_or_default());
                        }
                        None => found.add(MetadataKind::Exif),
                    },
                    Err(_) => found.add(MetadataKind::Exif),
                }
            }
            Some("Exif") => found.add(MetadataKind::Exif),
            Some("mime") if handle.metadata_content_type(id) == Some("application/rdf+xml") => {
                found.add(MetadataKind::Xmp);
            }
            _ => {}
        }
    }
    if handle.number_of_thumbnails() > 0 {
        found.add(MetadataKind::Thumbnail);
    }
    if !handle
        .auxiliary_images(AuxiliaryImagesFilter::OMIT_ALPHA)
        .is_empty()
    {
        found.add(MetadataKind::AuxiliaryImage);
    }
    found.into_vec()
}

/// The colours the file declares: an ICC profile, else `nclx` code points that are not sRGB's
/// (unspecified ones are taken as sRGB).
fn colours_of(handle: &ImageHandle) -> Option<Colours> {
    if let Some(raw) = handle.color_profile_raw()
        && matches!(
            raw.profile_type(),
            color_profile_types::PROF | color_profile_types::R_ICC
        )
    {
        return Some(Colours::Icc(raw.data));
    }
    let nclx = handle.color_profile_nclx()?;
    let cicp = moxcms::CicpProfile {
        color_primaries: (nclx.color_primaries() as u8).try_into().ok()?,
        transfer_characteristics: (nclx.transfer_characteristics() as u8).try_into().ok()?,
        matrix_coefficients: (nclx.matrix_coefficients() as u8).try_into().ok()?,
        full_range: nclx.full_range_flag() != 0,
    };
    let srgb = matches!(cicp.color_primaries, moxcms::CicpColorPrimaries::Bt709)
        && matches!(
            cicp.transfer_characteristics,
            moxcms::TransferCharacteristics::Srgb | moxcms::TransferCharacteristics::Bt709
        );
    (!srgb).then_some(Colours::Cicp(cicp))
}

/// A file libheif refuses: too large for the limits, or not a decodable HEIF image.
fn refused(e: HeifError) -> PipelineError {
    match e.sub_code {
        HeifErrorSubCode::SecurityLimitExceeded => {
            PipelineError::ImageTooLarge(format!("the HEIF image exceeds a limit: {}", e.message))
        }
        _ => PipelineError::InvalidImage(format!("cannot decode the image: {}", e.message)),
    }
}

fn cannot_start(e: HeifError) -> PipelineError {
    tracing::error!(error = %e, "libheif cannot start");
    PipelineError::Internal
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libheif reads the security limits we pass as its own version's struct: the bindings must
    /// be of the library linked (`max_bad_pixels` exists from 1.23 on), or it reads past the
    /// end of ours.
    #[test]
    fn the_bindings_are_of_the_library_linked() {
        // Compiles only against bindings of 1.23 or later.
        let _fields_of_1_23 = |limits: &libheif_sys::heif_security_limits| {
            (
                limits.max_bad_pixels,
                limits.max_iso23001_17_pixel_size_bytes,
            )
        };
        assert_eq!(LIBHEIF.version()[..2], [1, 23]);
    }
}
