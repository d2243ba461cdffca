//! The CPU part of the pipeline: decode (with limits; a large JPEG shrunk on load by libvips'
//! rule; a progressive one transcoded losslessly to baseline first, so that its coefficients
//! are freed before its pixels exist) → resize to the long edge (never upscaling; Lanczos3,
//! after a box filter for 4× or more, as libvips) → convert an embedded ICC profile's colours
//! to sRGB → apply the EXIF orientation to the resized image (never to the full-size one: a
//! phone portrait costs no second full-size buffer) → make the preview from those pixels →
//! encode. Metadata never survives: the output is encoded from pixels alone (no EXIF/GPS, XMP,
//! IPTC, comments, no profile: the pixels are sRGB). Opaque images become JPEG (libjpeg-turbo,
//! 4:2:0); images with alpha keep it as PNG.
//!
//! Pure and synchronous: the service runs it on its bounded blocking pool; `fuzz/` runs it on
//! arbitrary bytes.

use std::{io::Cursor, sync::LazyLock};

use fast_image_resize::{
    FilterType as ResizeFilter, PixelType, ResizeAlg, ResizeOptions, Resizer,
    images::{Image, ImageRef},
};
use follow_bus::{ErrorCode, Stage};
use image::{
    DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, codecs::png::PngEncoder,
    imageops::FilterType, metadata::Orientation,
};

use crate::{config::PipelineConfig, sniff};

/// Why an image cannot be processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    /// The bytes are not a decodable image of the declared type.
    #[error("{0}")]
    InvalidImage(String),
    /// Pixel or dimension limits.
    #[error("{0}")]
    ImageTooLarge(String),
    /// A failure of the pipeline itself (logged where it happened; never the client's fault).
    #[error("internal error")]
    Internal,
}

impl PipelineError {
    /// The contract's error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidImage(_) => ErrorCode::InvalidImage,
            Self::ImageTooLarge(_) => ErrorCode::ImageTooLarge,
            Self::Internal => ErrorCode::Internal,
        }
    }
}

/// One encoded output.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone)]
pub struct Output {
    /// Dimensions of the original, after orientation.
    pub width: u32,
    pub height: u32,
    pub image: Encoded,
    pub preview: Encoded,
}

/// Runs the pipeline over a whole body, calling `stage` as each stage begins.
pub fn run(
    bytes: &[u8],
    format: ImageFormat,
    config: &PipelineConfig,
    mut stage: impl FnMut(Stage),
) -> Result<Output, PipelineError> {
    stage(Stage::Decoding);
    let Decoded {
        image,
        orientation,
        icc_profile,
        width,
        height,
    } = decode(bytes, format, config.max_pixels, config.long_edge)?;
    stage(Stage::Processing);
    // The full-size decode is consumed by the main image's resize: peak memory is the decoded
    // image plus a band of rows and the output, never a second full-size buffer. The long edge
    // does not depend on the orientation, so turning the resized image gives the same result,
    // cheaper; so does converting its colours.
    let mut main = shrunk(image, config.long_edge)?;
    if let Some(profile) = icc_profile {
        to_srgb(&mut main, &profile);
    }
    turn_upright(&mut main, orientation);
    let preview = scaled(&main, config.preview_edge);
    let preview = preview.as_ref().unwrap_or(&main);
    stage(Stage::Encoding);
    Ok(Output {
        width,
        height,
        image: encode(&main, config.jpeg_quality)?,
        preview: encode(preview, config.jpeg_quality)?,
    })
}

/// A decoded image, maybe already shrunk, as stored (its EXIF `orientation` and ICC profile not
/// applied yet), and the size of the original after orientation.
#[derive(Debug)]
pub struct Decoded {
    pub image: DynamicImage,
    pub orientation: Orientation,
    pub icc_profile: Option<Vec<u8>>,
    pub width: u32,
    pub height: u32,
}

/// Decodes with limits on dimensions and allocation (a lying header cannot make it allocate
/// more than the pixels allowed) and reads the EXIF orientation and ICC profile. A large JPEG
/// comes out shrunk on load for a resize to `min_edge` ([`load_shrink`]).
pub fn decode(
    bytes: &[u8],
    format: ImageFormat,
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
    let common_jpeg =
        format == ImageFormat::Jpeg && sniff::jpeg_frame(bytes).is_some_and(|f| f.is_common());
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
            decode_full(bytes, format, max_pixels)
        })?
    } else {
        decode_full(bytes, format, max_pixels)?
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
        icc_profile,
        width,
        height,
    })
}

fn orientation_swaps(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

fn invalid(e: image::ImageError) -> PipelineError {
    match e {
        image::ImageError::Limits(l) => PipelineError::ImageTooLarge(l.to_string()),
        other => PipelineError::InvalidImage(format!("cannot decode the image: {other}")),
    }
}

/// What a decoder gives: the pixels, the EXIF orientation, the embedded ICC profile.
struct Pixels {
    image: DynamicImage,
    orientation: Orientation,
    icc_profile: Option<Vec<u8>>,
}

/// Any accepted format at full size, through `image`'s decoders (zune-jpeg for a JPEG that
/// libjpeg-turbo is not given or refused).
fn decode_full(
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
fn max_alloc(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(8).saturating_add(64 << 20)
}

/// libvips' shrink-on-load rule (`thumbnail`): the IDCT reduces by the largest of 8, 4 and 2
/// that still leaves the resampler a factor of 2 or more, so the DCT's box filter never does
/// most of the work; 1 when the image is less than 4 times the `edge` it is resized to.
fn load_shrink(long_edge: u64, edge: u32) -> u16 {
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
fn decode_jpeg(bytes: &[u8], max_pixels: u64, shrink: u16) -> Result<Pixels, PipelineError> {
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
fn jpeg_metadata(bytes: &[u8]) -> (Orientation, Option<Vec<u8>>) {
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

/// Output rows per band of [`shrunk`]'s vertical pass.
const BAND_ROWS: u32 = 64;

/// The resampling of both outputs, as libvips' `thumbnail`: Lanczos3 (the kernel widened by
/// the scale), after a box filter where the reduction is 4× or more ([`box_factors`]).
const RESAMPLING: ResizeAlg = ResizeAlg::Convolution(ResizeFilter::Lanczos3);

/// libvips' `reduce` with its default `gap` of 2: a reduction of 4× or more along an axis first
/// averages boxes of a whole number of pixels (`floor(factor / 2)`), so Lanczos3 is left
/// between 2× and 4× ([`box_shrink`]). Its result is a shade softer than Lanczos3 all the way
/// (and 1–2 % smaller as JPEG), for a fraction of the taps. The box per axis (at most
/// [`MAX_BOX`]), or `None` when no axis reduces 4×.
fn box_factors((width, height): (u32, u32), (dw, dh): (u32, u32)) -> Option<(u32, u32)> {
    let factor = |from: u32, to: u32| (from / to.max(1) / 2).clamp(1, MAX_BOX);
    let factors = (factor(width, dw), factor(height, dh));
    (factors != (1, 1)).then_some(factors)
}

/// The widest box along an axis: a box's sums (255 × 255 × 256 × 256 for alpha-weighted
/// colours) then fit in a `u32`. Lanczos3 does the rest of a reduction beyond 512×.
const MAX_BOX: u32 = 256;

/// The mean of each `kx`×`ky` box of `image`'s pixels, on the exact grid from the top-left
/// corner; the boxes past the right and bottom edges are completed with copies of the edge
/// pixels (libvips' `shrink` with `ceil`). Colours of RGBA pixels are weighted by their alpha,
/// so transparent pixels lend no colour. 8-bit grey, RGB and RGBA only.
fn box_shrink(image: &DynamicImage, (kx, ky): (u32, u32)) -> DynamicImage {
    let (width, height) = (image.width(), image.height());
    let (bw, bh) = (width.div_ceil(kx), height.div_ceil(ky));
    let channels = usize::from(image.color().channel_count());
    let alpha = image.color().has_alpha();
    let source = image.as_bytes();
    let row = width as usize * channels;
    let mut out = vec![0u8; bw as usize * bh as usize * channels];
    // Per source column and channel: the sum over the box's rows (colours times alpha for
    // RGBA).
    let mut sums = vec![0u32; row];
    let area = kx * ky;
    let rounded = |sum: u32, by: u32| u8::try_from((sum + by / 2) / by).unwrap_or(u8::MAX);
    for (oy, out_row) in out.chunks_exact_mut(bw as usize * channels).enumerate() {
        sums.fill(0);
        for dy in 0..ky {
            let y = (oy as u32 * ky + dy).min(height - 1) as usize;
            let line = &source[y * row..][..row];
            if alpha {
                for (sum, pixel) in sums.chunks_exact_mut(4).zip(line.chunks_exact(4)) {
                    let a = u32::from(pixel[3]);
                    for c in 0..3 {
                        sum[c] += u32::from(pixel[c]) * a;
                    }
                    sum[3] += a;
                }
            } else {
                for (sum, &value) in sums.iter_mut().zip(line) {
                    *sum += u32::from(value);
                }
            }
        }
        for (ox, pixel) in out_row.chunks_exact_mut(channels).enumerate() {
            let mut total = [0u32; 4];
            for dx in 0..kx {
                let x = (ox as u32 * kx + dx).min(width - 1) as usize;
                for (t, s) in total.iter_mut().zip(&sums[x * channels..][..channels]) {
                    *t += s;
                }
            }
            if alpha {
                let weight = total[3];
                for c in 0..3 {
                    pixel[c] = if weight == 0 {
                        0
                    } else {
                        rounded(total[c], weight)
                    };
                }
                pixel[3] = rounded(weight, area);
            } else {
                for (value, t) in pixel.iter_mut().zip(total) {
                    *value = rounded(t, area);
                }
            }
        }
    }
    from_raw(image.color(), (bw, bh), out).expect("the buffer is the boxed image's size")
}

/// 8-bit grey, RGB or RGBA `pixels` (rows of `width`, no padding) as an image; `None` when
/// they are not that size or of another type.
fn from_raw(
    color: image::ColorType,
    (width, height): (u32, u32),
    pixels: Vec<u8>,
) -> Option<DynamicImage> {
    match color {
        image::ColorType::L8 => {
            image::GrayImage::from_raw(width, height, pixels).map(DynamicImage::ImageLuma8)
        }
        image::ColorType::Rgb8 => {
            image::RgbImage::from_raw(width, height, pixels).map(DynamicImage::ImageRgb8)
        }
        image::ColorType::Rgba8 => {
            image::RgbaImage::from_raw(width, height, pixels).map(DynamicImage::ImageRgba8)
        }
        _ => None,
    }
}

/// Turns `image` upright as its EXIF `orientation` says. The quarter turns of 8-bit pixels (a
/// third of phone photos are stored on their side) copy tiles of 64 × 64 pixels, so that reads
/// and writes both stay in cache: 6 ms for a 2048 × 1536 image into memory already mapped,
/// where `image`'s own quarter turn, writing its output a column at a time, takes 17–22 ms
/// (a fresh output's page faults add ~6 ms to either). Everything else goes to `image`.
pub fn turn_upright(image: &mut DynamicImage, orientation: Orientation) {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let turned = match &*image {
        DynamicImage::ImageLuma8(grey) => quarter_turn::<1>(grey, (width, height), orientation),
        DynamicImage::ImageRgb8(rgb) => quarter_turn::<3>(rgb, (width, height), orientation),
        DynamicImage::ImageRgba8(rgba) => quarter_turn::<4>(rgba, (width, height), orientation),
        _ => None,
    };
    let size = (image.height(), image.width());
    match turned.and_then(|pixels| from_raw(image.color(), size, pixels)) {
        Some(turned) => *image = turned,
        None => image.apply_orientation(orientation),
    }
}

/// The pixels of a `width` × `height` image of `N`-byte pixels given a quarter turn (mirrored or
/// not) as `orientation` says, or `None` for an orientation that keeps rows as rows.
fn quarter_turn<const N: usize>(
    pixels: &[u8],
    (width, height): (usize, usize),
    orientation: Orientation,
) -> Option<Vec<u8>> {
    const TILE: usize = 64;
    // Column x of the source becomes line x of the output (EXIF 5, the transpose), or line
    // width-1-x; row y becomes column y or height-1-y.
    let (mirror_lines, mirror_columns) = match orientation {
        Orientation::Rotate90FlipH => (false, false),
        Orientation::Rotate90 => (false, true),
        Orientation::Rotate270 => (true, false),
        Orientation::Rotate270FlipH => (true, true),
        _ => return None,
    };
    let (source, []) = pixels.as_chunks::<N>() else {
        return None;
    };
    if width == 0 || source.len() != width * height {
        return None;
    }
    let mut turned = vec![[0; N]; source.len()];
    for top in (0..height).step_by(TILE) {
        for left in (0..width).step_by(TILE) {
            let right = (left + TILE).min(width);
            for (y, row) in source.chunks_exact(width).enumerate().skip(top).take(TILE) {
                let column = if mirror_columns { height - 1 - y } else { y };
                for (x, pixel) in (left..right).zip(&row[left..right]) {
                    let line = if mirror_lines { width - 1 - x } else { x };
                    turned[line * height + column] = *pixel;
                }
            }
        }
    }
    Some(turned.into_flattened())
}

/// `image` scaled down to a long edge of `edge` (unchanged when it fits), mostly in the memory
/// it already has. For 8-bit RGB and grey — every JPEG — the separable resize runs its vertical
/// pass first (the faster order for 8-bit pixels) band by band, and each band of shortened full
/// -width rows goes back into the image's own buffer as soon as no later band reads the source
/// rows it lands on (output row `r` reads source rows from about `(r - 2.5) * scale` on, so
/// after the first few bands at once). The buffer is then cut to the short image, and the
/// horizontal pass makes the result. Peak memory: the decoded image, a band, and the output.
/// Other pixel types take [`scaled`].
pub fn shrunk(image: DynamicImage, edge: u32) -> Result<DynamicImage, PipelineError> {
    let Some((dw, dh)) = target_size(image.width(), image.height(), edge) else {
        return Ok(image);
    };
    if box_factors((image.width(), image.height()), (dw, dh)).is_some() {
        // The box pass makes a buffer of half the image or less (a quarter when both axes box);
        // the in-place bands are for the rest.
        return Ok(scaled(&image, edge).unwrap_or(image));
    }
    let pixel = match &image {
        DynamicImage::ImageRgb8(_) => PixelType::U8x3,
        DynamicImage::ImageLuma8(_) => PixelType::U8,
        _ => return Ok(scaled(&image, edge).unwrap_or(image)),
    };
    let color = image.color();
    let (sw, sh) = (image.width(), image.height());
    let mut pixels = image.into_bytes();
    let row = sw as usize * pixel.size();
    let scale = f64::from(sh) / f64::from(dh);
    // The first source row that output rows from `r` on read (the filter's reach, rounded
    // down once more for safety).
    let first_read = |r: u32| ((f64::from(r) + 0.5 - 3.0) * scale - 1.0).max(0.0) as usize;
    let mut band = vec![0; row * BAND_ROWS as usize];
    let mut held: Vec<u8> = Vec::new();
    let mut written = 0;
    let mut resizer = Resizer::new();
    let vertical = (0..dh).step_by(BAND_ROWS as usize).try_for_each(|top| {
        let rows = BAND_ROWS.min(dh - top);
        let src = ImageRef::new(sw, sh, &pixels, pixel)?;
        let band = &mut band[..rows as usize * row];
        let mut dst = Image::from_slice_u8(sw, rows, band, pixel)?;
        let options = ResizeOptions::new().resize_alg(RESAMPLING).crop(
            0.0,
            f64::from(top) * scale,
            f64::from(sw),
            f64::from(rows) * scale,
        );
        resizer.resize(&src, &mut dst, &options)?;
        held.extend_from_slice(band);
        let done = (top + rows) as usize;
        let free = if done < dh as usize {
            first_read(top + rows).min(done)
        } else {
            done
        };
        if free > written {
            let n = (free - written) * row;
            pixels[written * row..][..n].copy_from_slice(&held[..n]);
            held.drain(..n);
            written = free;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    drop((band, held));
    pixels.truncate(dh as usize * row);
    pixels.shrink_to_fit();
    let out = vertical
        .and_then(|()| {
            let src = ImageRef::new(sw, dh, &pixels, pixel)?;
            let mut dst = Image::new(dw, dh, pixel);
            resizer.resize(&src, &mut dst, &ResizeOptions::new().resize_alg(RESAMPLING))?;
            Ok(dst.into_vec())
        })
        .map_err(|e| {
            tracing::error!(error = %e, "banded resize failed");
            PipelineError::Internal
        })?;
    from_raw(color, (dw, dh), out).ok_or(PipelineError::Internal)
}

/// The size of an image scaled to a long edge of `edge`, or `None` when it already fits.
fn target_size(width: u32, height: u32, edge: u32) -> Option<(u32, u32)> {
    let (w, h) = (u64::from(width), u64::from(height));
    if w.max(h) <= u64::from(edge) {
        return None;
    }
    // Rounded to the nearest, as libvips does.
    let shorter = |long: u64, short: u64| {
        u32::try_from(((short * u64::from(edge) + long / 2) / long).max(1)).unwrap_or(1)
    };
    Some(if w >= h {
        (edge, shorter(w, h))
    } else {
        (shorter(h, w), edge)
    })
}

/// The image scaled down so its long edge is `edge`, or `None` when it already fits (never
/// upscaled). Resized in 8-bit RGB(A) with SIMD convolution (`fast_image_resize`, alpha
/// premultiplied): no float copies of the image, several times faster than `image`'s resize.
pub fn scaled(image: &DynamicImage, edge: u32) -> Option<DynamicImage> {
    let (dw, dh) = target_size(image.width(), image.height(), edge)?;
    let converted;
    let source = match image {
        DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_) => image,
        other if other.color().has_alpha() => {
            converted = DynamicImage::ImageRgba8(other.to_rgba8());
            &converted
        }
        other => {
            converted = DynamicImage::ImageRgb8(other.to_rgb8());
            &converted
        }
    };
    let mut resizer = Resizer::new();
    let mut target = DynamicImage::new(dw, dh, source.color());
    let lanczos = ResizeOptions::new().resize_alg(RESAMPLING);
    let resized = match box_factors((source.width(), source.height()), (dw, dh)) {
        // Lanczos3 over the boxes, mapped back onto the source's exact extent (the last boxes
        // reach past it), as libvips' `reduce` does after its `shrink`.
        Some((kx, ky)) => resizer.resize(
            &box_shrink(source, (kx, ky)),
            &mut target,
            &lanczos.crop(
                0.0,
                0.0,
                f64::from(source.width()) / f64::from(kx),
                f64::from(source.height()) / f64::from(ky),
            ),
        ),
        None => resizer.resize(source, &mut target, &lanczos),
    };
    match resized {
        Ok(()) => Some(target),
        Err(e) => {
            tracing::warn!(error = %e, "fast resize failed; using the slow path");
            Some(source.resize(edge, edge, FilterType::Lanczos3))
        }
    }
}

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

/// JPEG for opaque pixels through libjpeg-turbo (quality `quality`, 4:2:0 — grey stays grey —,
/// optimized Huffman tables: 10–20 % fewer bytes for the same pixels), PNG (lossless, alpha
/// kept) otherwise.
pub fn encode(image: &DynamicImage, quality: u8) -> Result<Encoded, PipelineError> {
    let (bytes, content_type) = if image.color().has_alpha() {
        let mut bytes = Vec::new();
        image
            .to_rgba8()
            .write_with_encoder(PngEncoder::new(&mut bytes))
            .map_err(|e| encoding_failed("PNG", e))?;
        (bytes, "image/png")
    } else {
        use turbojpeg::{Compressor, Image, PixelFormat, Subsamp};
        let converted;
        let (pixels, format, subsamp, channels): (&[u8], _, _, _) = match image {
            // No copy for what JPEG takes as it is (every decoded JPEG).
            DynamicImage::ImageRgb8(rgb) => (rgb, PixelFormat::RGB, Subsamp::Sub2x2, 3),
            DynamicImage::ImageLuma8(grey) => (grey, PixelFormat::GRAY, Subsamp::Gray, 1),
            other => {
                converted = other.to_rgb8();
                (&converted, PixelFormat::RGB, Subsamp::Sub2x2, 3)
            }
        };
        let (width, height) = (image.width() as usize, image.height() as usize);
        let bytes = Compressor::new()
            .and_then(|mut compressor| {
                compressor.set_quality(i32::from(quality))?;
                compressor.set_subsamp(subsamp)?;
                compressor.set_optimize(true)?;
                compressor.compress_to_vec(Image {
                    pixels,
                    width,
                    pitch: width * channels,
                    height,
                    format,
                })
            })
            .map_err(|e| encoding_failed("JPEG", e))?;
        (bytes, "image/jpeg")
    };
    Ok(Encoded {
        bytes,
        content_type,
        width: image.width(),
        height: image.height(),
    })
}

/// Encoding our own pixels cannot fail for the client's reasons.
fn encoding_failed(format: &str, error: impl std::fmt::Display) -> PipelineError {
    tracing::error!(%error, "{format} encoding failed");
    PipelineError::Internal
}

#[cfg(test)]
mod tests {
    use image::{GenericImageView, ImageBuffer, Rgb, Rgba, codecs::jpeg::JpegEncoder};

    use super::*;

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let img = ImageBuffer::from_fn(width, height, |x, _| Rgb([(x % 256) as u8, 0, 0]));
        let mut out = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_with_encoder(JpegEncoder::new_with_quality(&mut out, 90))
            .unwrap();
        out
    }

    /// A progressive JPEG, transcoded to baseline before decoding, comes out exactly as
    /// TurboJPEG's direct decode makes it: grey and every common subsampling, odd sizes, shrunk
    /// on load or not.
    #[test]
    fn progressive_jpegs_decode_to_the_same_pixels_through_a_baseline_transcode() {
        use turbojpeg::{Compressor, Decompressor, Image, PixelFormat, ScalingFactor, Subsamp};
        let mut rng = fastrand::Rng::with_seed(7);
        let subsamplings = [
            Subsamp::Sub2x2,
            Subsamp::Sub2x1,
            Subsamp::None,
            Subsamp::Gray,
        ];
        for (width, height) in [(5, 7), (17, 9), (333, 251)] {
            let pixels: Vec<u8> = (0..width * height * 3).map(|_| rng.u8(..)).collect();
            for subsamp in subsamplings {
                let mut compressor = Compressor::new().unwrap();
                compressor.set_subsamp(subsamp).unwrap();
                compressor.set_progressive(true).unwrap();
                let image = Image {
                    pixels: &pixels[..],
                    width,
                    pitch: width * 3,
                    height,
                    format: PixelFormat::RGB,
                };
                let jpeg = compressor.compress_to_vec(image).unwrap();
                for shrink in [1, 2] {
                    let mut decompressor = Decompressor::new().unwrap();
                    let factor = ScalingFactor::new(1, shrink);
                    decompressor.set_scaling_factor(factor).unwrap();
                    let header = decompressor.read_header(&jpeg).unwrap().scaled(factor);
                    let format = match subsamp {
                        Subsamp::Gray => PixelFormat::GRAY,
                        _ => PixelFormat::RGB,
                    };
                    let pitch = header.width * format.size();
                    let mut expected = vec![0; pitch * header.height];
                    let output = Image {
                        pixels: &mut expected[..],
                        width: header.width,
                        pitch,
                        height: header.height,
                        format,
                    };
                    decompressor.decompress(&jpeg, output).unwrap();
                    let ours = decode_jpeg(&jpeg, 1 << 30, shrink as u16).unwrap().image;
                    let case = format!("{width} × {height}, {subsamp:?}, 1/{shrink}");
                    assert_eq!(ours.as_bytes(), expected, "{case}");
                }
            }
        }
    }

    /// Every EXIF orientation of grey, RGB and RGBA pixels (odd sizes, each pixel distinct)
    /// comes out exactly as `image`'s own `apply_orientation` makes it.
    #[test]
    fn turns_upright_as_image_does() {
        let value = |x: u32, y: u32, c: u32| (x * 31 + y * 7 + c * 101) as u8;
        let images = [
            DynamicImage::ImageLuma8(ImageBuffer::from_fn(7, 3, |x, y| {
                image::Luma([value(x, y, 0)])
            })),
            DynamicImage::ImageRgb8(ImageBuffer::from_fn(5, 9, |x, y| {
                Rgb([0, 1, 2].map(|c| value(x, y, c)))
            })),
            DynamicImage::ImageRgba8(ImageBuffer::from_fn(4, 6, |x, y| {
                Rgba([0, 1, 2, 3].map(|c| value(x, y, c)))
            })),
        ];
        for image in images {
            for exif in 1..=8 {
                let orientation = Orientation::from_exif(exif).unwrap();
                let mut ours = image.clone();
                turn_upright(&mut ours, orientation);
                let mut theirs = image.clone();
                theirs.apply_orientation(orientation);
                assert_eq!(ours, theirs, "{:?}, EXIF {exif}", image.color());
            }
        }
    }

    #[test]
    fn resizes_to_the_long_edge_and_never_upscales() {
        let config = PipelineConfig {
            long_edge: 64,
            preview_edge: 16,
            ..PipelineConfig::default()
        };
        let mut stages = Vec::new();
        let out = run(&jpeg(200, 100), ImageFormat::Jpeg, &config, |s| {
            stages.push(s)
        })
        .unwrap();
        assert_eq!(
            stages,
            [Stage::Decoding, Stage::Processing, Stage::Encoding]
        );
        assert_eq!((out.width, out.height), (200, 100));
        assert_eq!((out.image.width, out.image.height), (64, 32));
        assert_eq!((out.preview.width, out.preview.height), (16, 8));
        assert_eq!(out.image.content_type, "image/jpeg");
        let small = run(&jpeg(10, 20), ImageFormat::Jpeg, &config, |_| {}).unwrap();
        assert_eq!((small.image.width, small.image.height), (10, 20));
    }

    #[test]
    fn large_jpegs_shrink_on_load_to_the_same_sizes() {
        let config = PipelineConfig {
            long_edge: 512,
            preview_edge: 64,
            ..PipelineConfig::default()
        };
        let big = jpeg(2100, 300);
        assert!(sniff::jpeg_frame(&big).is_some_and(|f| f.is_common()));
        let out = run(&big, ImageFormat::Jpeg, &config, |_| {}).unwrap();
        assert_eq!((out.width, out.height), (2100, 300));
        assert_eq!((out.image.width, out.image.height), (512, 73));
        assert_eq!((out.preview.width, out.preview.height), (64, 9));
        // The pixels survive the DCT-domain shrink: red is the source column mod 256.
        let main = image::load_from_memory(&out.image.bytes).unwrap().to_rgb8();
        for x in [10u32, 50, 100, 300] {
            let expected = i32::try_from(x * 2100 / 512 % 256).unwrap();
            let red = i32::from(main.get_pixel(x, 36)[0]);
            assert!(
                (red - expected).abs() <= 12,
                "x {x}: red {red}, expected {expected}"
            );
        }
    }

    #[test]
    fn the_banded_in_place_resize_matches_the_plain_one() {
        // Noise: a source row overwritten too early would show. Scales near 1 keep many bands
        // waiting before they may go home; large ones free rows at once; portraits have more
        // rows than columns.
        let noise = |x: u32, y: u32, c: u32| {
            let h = (x.wrapping_mul(73_856_093)
                ^ y.wrapping_mul(19_349_663)
                ^ c.wrapping_mul(83_492_791))
            .wrapping_mul(2_654_435_761);
            (h >> 24) as u8
        };
        let image = |width: u32, height: u32| {
            DynamicImage::ImageRgb8(ImageBuffer::from_fn(width, height, |x, y| {
                Rgb([noise(x, y, 0), noise(x, y, 1), noise(x, y, 2)])
            }))
        };
        for (width, height, edge) in [
            (1000, 301, 256),
            (301, 1000, 256),
            (700, 1050, 1024),
            (1500, 2100, 2048),
            (1800, 2400, 64),
        ] {
            let source = image(width, height);
            let plain = scaled(&source, edge).unwrap().to_rgb8();
            let banded = shrunk(source, edge).unwrap().to_rgb8();
            assert_eq!(plain.dimensions(), banded.dimensions());
            let worst = plain
                .as_raw()
                .iter()
                .zip(banded.as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            assert!(
                worst <= 2,
                "{width}x{height} to {edge}: largest difference {worst}"
            );
        }
        let source = image(1000, 301);
        let grey = DynamicImage::ImageLuma8(source.to_luma8());
        assert_eq!(shrunk(grey, 256).unwrap().dimensions(), (256, 77));
        let small = shrunk(source, 5000).unwrap();
        assert_eq!(small.dimensions(), (1000, 301));
    }

    #[test]
    fn a_jpeg_libjpeg_turbo_only_warns_about_is_still_processed() {
        // Stray bytes before the end marker: libjpeg-turbo warns ("extraneous bytes") and so
        // refuses; the photo must still be processed, as libvips would.
        let mut bytes = jpeg(64, 48);
        let end = bytes.len() - 2;
        bytes.splice(end..end, *b"junk!");
        assert!(decode_jpeg(&bytes, u64::MAX, 1).is_err());
        let out = run(
            &bytes,
            ImageFormat::Jpeg,
            &PipelineConfig::default(),
            |_| {},
        )
        .unwrap();
        assert_eq!((out.width, out.height), (64, 48));
    }

    #[test]
    fn reductions_of_4x_or_more_are_boxed_first_as_libvips_does() {
        // The preview: 6.4x, boxes of 3 then Lanczos3 for 2.13x.
        assert_eq!(box_factors((2048, 1536), (320, 240)), Some((3, 3)));
        // Under 4x (a JPEG after shrink-on-load, unless 32x its edge or more): Lanczos3
        // alone.
        assert_eq!(box_factors((4032, 3024), (2048, 1536)), None);
        assert_eq!(box_factors((8000, 6000), (2048, 1536)), None);
        // Each axis on its own.
        assert_eq!(box_factors((10_000, 30), (2000, 20)), Some((2, 1)));
        let source = DynamicImage::ImageRgb8(ImageBuffer::from_fn(2048, 1536, |x, y| {
            Rgb([(x / 7) as u8, (y / 5) as u8, ((x + y) / 13) as u8])
        }));
        assert_eq!(scaled(&source, 320).unwrap().dimensions(), (320, 240));
        assert_eq!(shrunk(source, 320).unwrap().dimensions(), (320, 240));
    }

    #[test]
    fn boxes_are_exact_with_edge_copies_and_alpha_weighted() {
        let rgb = ImageBuffer::from_fn(5, 4, |x, y| Rgb([(10 * x + y) as u8, 100, (x * y) as u8]));
        let boxed = box_shrink(&DynamicImage::ImageRgb8(rgb.clone()), (2, 3)).to_rgb8();
        assert_eq!(boxed.dimensions(), (3, 2));
        // Columns 0-1, rows 0-2: reds 0,1,2,10,11,12 average 6.
        assert_eq!(boxed.get_pixel(0, 0).0, [6, 100, 1]);
        // The corner box is column 4 and row 3 repeated: the corner pixel itself.
        assert_eq!(boxed.get_pixel(2, 1), rgb.get_pixel(4, 3));
        // A transparent red pixel lends no colour to its opaque blue neighbour.
        let rgba = ImageBuffer::from_fn(2, 1, |x, _| {
            if x == 0 {
                Rgba([255, 0, 0, 0])
            } else {
                Rgba([0, 0, 255, 255])
            }
        });
        let boxed = box_shrink(&DynamicImage::ImageRgba8(rgba), (2, 1)).to_rgba8();
        assert_eq!(boxed.get_pixel(0, 0).0, [0, 0, 255, 128]);
    }

    #[test]
    fn boxed_previews_stay_on_the_source_grid() {
        // Fine detail (a 64-px wave, 10 px in the preview) through the 6.4x preview reduction:
        // boxes on the exact grid, then Lanczos3 mapped onto the source's extent, stay within a
        // few levels of Lanczos3 all the way (mean 0.28, worst 3). Boxes stretched to the
        // rounded size (683 for 682.67) wander by up to half a source pixel: mean 1.19, worst 6.
        let wave =
            |v: u32| (128.0 + 100.0 * (f64::from(v) * std::f64::consts::TAU / 64.0).sin()) as u8;
        let source = DynamicImage::ImageRgb8(ImageBuffer::from_fn(2048, 1536, |x, y| {
            Rgb([wave(x), wave(y), wave(x + y)])
        }));
        let mut reference = DynamicImage::new(320, 240, source.color());
        Resizer::new()
            .resize(
                &source,
                &mut reference,
                &ResizeOptions::new().resize_alg(RESAMPLING),
            )
            .unwrap();
        let boxed = scaled(&source, 320).unwrap();
        let diffs: Vec<u8> = reference
            .as_bytes()
            .iter()
            .zip(boxed.as_bytes())
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
        let worst = diffs.iter().max().copied().unwrap();
        assert!(mean < 0.6 && worst <= 4, "mean {mean:.2}, worst {worst}");
    }

    #[test]
    fn alpha_is_kept_as_png() {
        let img = ImageBuffer::from_fn(40, 30, |x, _| Rgba([0, 0, 255, (x * 6) as u8]));
        let mut png = Vec::new();
        DynamicImage::ImageRgba8(img)
            .write_with_encoder(PngEncoder::new(&mut png))
            .unwrap();
        let out = run(&png, ImageFormat::Png, &PipelineConfig::default(), |_| {}).unwrap();
        assert_eq!(out.image.content_type, "image/png");
        let back = image::load_from_memory(&out.image.bytes).unwrap();
        assert!(back.color().has_alpha());
    }

    /// What `fuzz/` does at scale, deterministically: corrupted real images of each format
    /// (bytes flipped, cut, spliced) always end in an image or a typed refusal.
    #[test]
    fn corrupted_images_never_panic() {
        let mut png = Vec::new();
        DynamicImage::ImageRgba8(ImageBuffer::from_fn(48, 32, |x, y| {
            Rgba([x as u8, y as u8, 0, 200])
        }))
        .write_with_encoder(PngEncoder::new(&mut png))
        .unwrap();
        let mut webp = Vec::new();
        DynamicImage::ImageRgb8(ImageBuffer::from_fn(48, 32, |x, y| {
            Rgb([x as u8, y as u8, 9])
        }))
        .write_with_encoder(image::codecs::webp::WebPEncoder::new_lossless(&mut webp))
        .unwrap();
        let config = PipelineConfig {
            max_pixels: 1_000_000,
            long_edge: 32,
            preview_edge: 16,
            ..PipelineConfig::default()
        };
        let mut rng = fastrand::Rng::with_seed(0x2545_F491_4F6C_DD1D);
        for (original, format) in [
            (jpeg(48, 32), ImageFormat::Jpeg),
            (png, ImageFormat::Png),
            (webp, ImageFormat::WebP),
        ] {
            for _ in 0..300 {
                let _ = run(&damaged(&original, &mut rng), format, &config, |_| {});
            }
        }
    }

    /// A hostile ICC profile — every truncation of a real one, and 2,000 damaged copies — never
    /// panics the colour conversion (it converts, or leaves the pixels as they were).
    #[test]
    fn damaged_icc_profiles_never_panic() {
        let p3 = include_bytes!("../tests/fixtures/display-p3.icc");
        let image = DynamicImage::ImageRgb8(ImageBuffer::from_fn(8, 2, |x, _| {
            Rgb([x as u8 * 30, 100, 200])
        }));
        for len in 0..p3.len() {
            to_srgb(&mut image.clone(), &p3[..len]);
        }
        let mut rng = fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2_000 {
            to_srgb(&mut image.clone(), &damaged(p3, &mut rng));
        }
    }

    /// `original` damaged the same way on every run of a seed: a few bytes changed, the end cut
    /// off, or junk spliced in.
    fn damaged(original: &[u8], rng: &mut fastrand::Rng) -> Vec<u8> {
        let mut bytes = original.to_vec();
        match rng.u8(0..3) {
            0 => {
                for _ in 0..rng.usize(1..=8) {
                    let at = rng.usize(0..bytes.len());
                    bytes[at] = rng.u8(..);
                }
            }
            1 => bytes.truncate(rng.usize(0..bytes.len())),
            _ => {
                let at = rng.usize(0..bytes.len());
                let junk: Vec<u8> = (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect();
                bytes.splice(at..at, junk);
            }
        }
        bytes
    }

    #[test]
    fn truncated_mislabelled_and_garbage_bytes_are_invalid_never_a_panic() {
        let good = jpeg(64, 64);
        let cases: Vec<(Vec<u8>, ImageFormat)> = vec![
            (good[..good.len() / 2].to_vec(), ImageFormat::Jpeg),
            (good.clone(), ImageFormat::Png),
            (b"\xFF\xD8\xFF".to_vec(), ImageFormat::Jpeg),
            (vec![0; 10_000], ImageFormat::Jpeg),
            (Vec::new(), ImageFormat::WebP),
        ];
        for (bytes, format) in cases {
            let result = run(&bytes, format, &PipelineConfig::default(), |_| {});
            assert!(
                matches!(result, Err(PipelineError::InvalidImage(_))),
                "{format:?} {} bytes: {result:?}",
                bytes.len()
            );
        }
    }
}
