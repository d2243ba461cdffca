//! Decoding with limits: a large JPEG shrunk on load by libvips' rule through libjpeg-turbo (a
//! progressive one transcoded losslessly to baseline first), HEIF through libheif (`heif`),
//! anything else through `image`.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, metadata::Orientation};

use follow_bus::MetadataKind;

use super::{heif::decode_heif, metadata, orient::orientation_swaps, *};
use crate::{
    error::PipelineError,
    sniff::{self, Format},
};

/// A decoded image, maybe already shrunk, as stored (its EXIF `orientation` and declared
/// colours not applied yet), and the size of the original after orientation.
#[derive(Debug)]
pub struct Decoded {
    pub image: DynamicImage,
    pub orientation: Orientation,
    pub colours: Option<Colours>,
    /// The kinds of metadata the file carries (none of which the outputs keep).
    pub metadata: Vec<MetadataKind>,
    pub width: u32,
    pub height: u32,
}

/// Decodes with limits on dimensions and allocation (a lying header cannot make it allocate
/// more than the pixels allowed) and reads the EXIF orientation and declared colours. A large
/// JPEG comes out shrunk on load for a resize to `min_edge` ([`load_shrink`]).
pub fn decode(
    bytes: &[u8],
    format: Format,
    max_pixels: u64,
    min_edge: u32,
) -> Result<Decoded, PipelineError> {
    let sniffed = sniff::sniff(&bytes[..bytes.len().min(sniff::MAGIC_LEN)])?;
    if sniffed != format {
        return Err(PipelineError::InvalidImage(
            "the bytes are not of the declared type".into(),
        ));
    }
    let sniff::Header::Dimensions { width, height } = sniff::check_header(bytes, max_pixels)?
    else {
        return Err(PipelineError::InvalidImage(
            "the image header is incomplete".into(),
        ));
    };
    sniff::check_complete(bytes, format)?;
    let image_format = match format.image_format() {
        Some(image_format) => image_format,
        // The size libheif reads from the primary image, after its transforms, is the one
        // clients are told.
        None => return decode_heif(bytes, max_pixels),
    };
    let common_jpeg =
        format == Format::Jpeg && sniff::jpeg_frame(bytes).is_some_and(|f| f.is_common());
    let Pixels {
        image,
        orientation,
        icc_profile,
    } = if common_jpeg {
        let shrink = load_shrink(width.max(height), min_edge);
        // libjpeg-turbo refuses a file over a mere warning (stray bytes, a few missing at the
        // end) that `image`'s decoder takes, as libvips does: those get a second chance there.
        decode_jpeg(bytes, max_pixels, shrink).or_else(|e| {
            tracing::debug!(error = %e, "libjpeg-turbo refused the JPEG; trying zune-jpeg");
            decode_full(bytes, image_format, max_pixels)
        })?
    } else {
        decode_full(bytes, image_format, max_pixels)?
    };
    // The header's size, not the decoder's: a JPEG may declare a height its scans never reach,
    // and the original size is what clients are told.
    let (width, height) = (
        u32::try_from(width).unwrap_or(u32::MAX),
        u32::try_from(height).unwrap_or(u32::MAX),
    );
    let (width, height) = if orientation_swaps(orientation) {
        (height, width)
    } else {
        (width, height)
    };
    Ok(Decoded {
        image,
        orientation,
        colours: icc_profile.map(Colours::Icc),
        metadata: metadata::of(bytes, format).into_vec(),
        width,
        height,
    })
}

pub(super) fn invalid(e: image::ImageError) -> PipelineError {
    match e {
        image::ImageError::Limits(l) => PipelineError::ImageTooLarge(l.to_string()),
        other => PipelineError::InvalidImage(format!("cannot decode the image: {other}")),
    }
}

/// What a decoder gives: the pixels, the EXIF orientation, the embedded ICC profile.
pub(super) struct Pixels {
    pub(super) image: DynamicImage,
    pub(super) orientation: Orientation,
    pub(super) icc_profile: Option<Vec<u8>>,
}

/// Any accepted format at full size, through `image`'s decoders (zune-jpeg for a JPEG that
/// libjpeg-turbo is not given or refused).
pub(super) fn decode_full(
    bytes: &[u8],
    format: ImageFormat,
    max_pixels: u64,
) -> Result<Pixels, PipelineError> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits.max_alloc = Some(max_alloc(max_pixels));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(invalid)?;
    let orientation = decoder.orientation().map_err(invalid)?;
    // A profile that cannot be read leaves the pixels as they are (taken as sRGB).
    let icc_profile = decoder.icc_profile().ok().flatten();
    let image = DynamicImage::from_decoder(decoder).map_err(invalid)?;
    Ok(Pixels {
        image,
        orientation,
        icc_profile,
    })
}

/// RGBA16 is the widest buffer a decoder makes: 8 bytes per pixel, plus slack for tables.
pub(super) fn max_alloc(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(8).saturating_add(64 << 20)
}

/// libvips' shrink-on-load rule (`thumbnail`): the IDCT reduces by the largest of 8, 4 and 2
/// that still leaves the resampler a factor of 2 or more, so the DCT's box filter never does
/// most of the work; 1 when the image is less than 4 times the `edge` it is resized to.
pub(super) fn load_shrink(long_edge: u64, edge: u32) -> u16 {
    let edge = u64::from(edge).max(1);
    match long_edge / edge {
        16.. => 8,
        8..16 => 4,
        4..8 => 2,
        _ => 1,
    }
}

/// A common JPEG frame (`JpegFrame::is_common`) through libjpeg-turbo, the decoder libvips uses
/// (SIMD Huffman, IDCT and upsampling), with the IDCT run at 1/`shrink` of the size
/// (shrink-on-load: several times faster, its buffer a fraction of the full image). The EXIF
/// orientation and ICC profile come from zune-jpeg's read of the headers. (The number of
/// scans, which bounds a progressive decode's time, was checked with the body: `sniff`.)
///
/// A progressive JPEG's coefficients are all held until its last scan (2 bytes per sample: as
/// many bytes as its RGB pixels for 4:2:0, twice as many for 4:4:4), and TurboJPEG decodes a
/// whole frame, so its pixels would come on top of them. It is transcoded losslessly to a
/// baseline JPEG first (the same coefficients, so the same pixels), which frees the
/// coefficients before the pixels exist: the peak is the coefficients and the baseline file,
/// then a baseline decode's.
pub(super) fn decode_jpeg(
    bytes: &[u8],
    max_pixels: u64,
    shrink: u16,
) -> Result<Pixels, PipelineError> {
    use turbojpeg::{
        Colorspace, Decompressor, Image, PixelFormat, ScalingFactor, Transform, TransformOp,
        Transformer,
    };
    let failed =
        |e: turbojpeg::Error| PipelineError::InvalidImage(format!("cannot decode the image: {e}"));
    let cannot_start = |e: turbojpeg::Error| {
        tracing::error!(error = %e, "libjpeg-turbo cannot start");
        PipelineError::Internal
    };
    let mut decompressor = Decompressor::new().map_err(cannot_start)?;
    let header = decompressor.read_header(bytes).map_err(failed)?;
    let baseline;
    let jpeg = if header.is_progressive {
        let mut transform = Transform::op(TransformOp::None);
        transform.copy_none = true;
        baseline = Transformer::new()
            .map_err(cannot_start)?
            .transform_to_vec(&transform, bytes)
            .map_err(failed)?;
        baseline.as_slice()
    } else {
        bytes
    };
    let factor = ScalingFactor::new(1, usize::from(shrink));
    decompressor.set_scaling_factor(factor).map_err(failed)?;
    let size = header.scaled(factor);
    let (format, color) = match header.colorspace {
        Colorspace::Gray => (PixelFormat::GRAY, image::ColorType::L8),
        _ => (PixelFormat::RGB, image::ColorType::Rgb8),
    };
    let channels = usize::from(color.channel_count());
    // The header was checked against the limit already; this is the decoder's own reading.
    if size.width as u64 * size.height as u64 > max_pixels {
        return Err(PipelineError::ImageTooLarge(
            "the image has more pixels than allowed".into(),
        ));
    }
    let mut pixels = vec![0; size.width * size.height * channels];
    decompressor
        .decompress(
            jpeg,
            Image {
                pixels: pixels.as_mut_slice(),
                width: size.width,
                pitch: size.width * channels,
                height: size.height,
                format,
            },
        )
        .map_err(failed)?;
    let (width, height) = (
        u32::try_from(size.width).map_err(|_| PipelineError::Internal)?,
        u32::try_from(size.height).map_err(|_| PipelineError::Internal)?,
    );
    let image = from_raw(color, (width, height), pixels).ok_or(PipelineError::Internal)?;
    let (orientation, icc_profile) = jpeg_metadata(bytes);
    Ok(Pixels {
        image,
        orientation,
        icc_profile,
    })
}

/// A JPEG's EXIF orientation and ICC profile from its headers alone; a part that cannot be read
/// is left out (no turn, taken as sRGB), as `image` does.
pub(super) fn jpeg_metadata(bytes: &[u8]) -> (Orientation, Option<Vec<u8>>) {
    let options = zune_core::options::DecoderOptions::default()
        .set_max_width(usize::from(u16::MAX))
        .set_max_height(usize::from(u16::MAX));
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(
        zune_core::bytestream::ZCursor::new(bytes),
        options,
    );
    if decoder.decode_headers().is_err() {
        return (Orientation::NoTransforms, None);
    }
    let orientation = decoder
        .exif()
        .and_then(|exif| Orientation::from_exif_chunk(exif))
        .unwrap_or(Orientation::NoTransforms);
    (orientation, decoder.icc_profile())
}
