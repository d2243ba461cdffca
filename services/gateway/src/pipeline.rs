//! The CPU part of the pipeline: decode (with limits; a large JPEG shrunk on load by libvips'
//! rule) → resize to the long edge (never upscaling; Lanczos3) → convert an embedded ICC
//! profile's colours to sRGB → apply the EXIF orientation to the resized image (never to the
//! full-size one: a phone portrait costs no second full-size buffer) → make the preview from
//! those pixels → encode. Metadata never survives: the output is encoded from pixels alone (no
//! EXIF/GPS, XMP, IPTC, comments, no profile: the pixels are sRGB). Opaque images become JPEG
//! (4:2:0, SIMD encoder); images with alpha keep it as PNG.
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
use jpeg_encoder::{ChromaSubsamplingMethod, ColorType, SamplingFactor};

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
    main.apply_orientation(orientation);
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
    let shrink = if format == ImageFormat::Jpeg
        && sniff::jpeg_frame(bytes).is_some_and(|frame| frame.is_common())
    {
        load_shrink(width.max(height), min_edge)
    } else {
        1
    };
    let Pixels {
        image,
        orientation,
        icc_profile,
    } = if shrink > 1 {
        decode_jpeg_shrunk(bytes, max_pixels, (width, height), shrink)?
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

/// Any accepted format at full size, through `image`'s decoders (zune-jpeg for JPEG).
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

/// Shrink-on-load, as libjpeg does for libvips: the IDCT runs at 1/`shrink` of the size. The
/// decode is several times faster and its buffers a fraction of the full image. Only for the
/// common frames (`JpegFrame::is_common`), which this decoder handles without surprises.
fn decode_jpeg_shrunk(
    bytes: &[u8],
    max_pixels: u64,
    (width, height): (u64, u64),
    shrink: u16,
) -> Result<Pixels, PipelineError> {
    let failed = |e: jpeg_decoder::Error| {
        PipelineError::InvalidImage(format!("cannot decode the image: {e}"))
    };
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    decoder
        .set_max_decoding_buffer_size(usize::try_from(max_alloc(max_pixels)).unwrap_or(usize::MAX));
    // The decoder picks the smallest IDCT whose output covers the request: ask for 1/shrink.
    let request = |side: u64| u16::try_from(side.div_ceil(u64::from(shrink))).unwrap_or(u16::MAX);
    let (width, height) = decoder
        .scale(request(width), request(height))
        .map_err(failed)?;
    let pixels = decoder.decode().map_err(failed)?;
    let (width, height) = (u32::from(width), u32::from(height));
    let image = match decoder.info().map(|info| info.pixel_format) {
        Some(jpeg_decoder::PixelFormat::RGB24) => {
            image::RgbImage::from_raw(width, height, pixels).map(DynamicImage::ImageRgb8)
        }
        Some(jpeg_decoder::PixelFormat::L8) => {
            image::GrayImage::from_raw(width, height, pixels).map(DynamicImage::ImageLuma8)
        }
        _ => None,
    }
    .ok_or_else(|| PipelineError::InvalidImage("the JPEG decoded to an unexpected shape".into()))?;
    let orientation = decoder
        .exif_data()
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms);
    Ok(Pixels {
        image,
        orientation,
        icc_profile: decoder.icc_profile(),
    })
}

/// Output rows per band of [`shrunk`]'s vertical pass.
const BAND_ROWS: u32 = 64;

/// The resampling of both outputs: Lanczos3 over the whole reduction (the kernel widened by the
/// scale), as libvips' `thumbnail` (a box filter only where a JPEG is shrunk on load).
const RESAMPLING: ResizeAlg = ResizeAlg::Convolution(ResizeFilter::Lanczos3);

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
    match color {
        image::ColorType::L8 => {
            image::GrayImage::from_raw(dw, dh, out).map(DynamicImage::ImageLuma8)
        }
        _ => image::RgbImage::from_raw(dw, dh, out).map(DynamicImage::ImageRgb8),
    }
    .ok_or(PipelineError::Internal)
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
    let mut target = DynamicImage::new(dw, dh, source.color());
    let options = ResizeOptions::new().resize_alg(RESAMPLING);
    match Resizer::new().resize(source, &mut target, &options) {
        Ok(()) => Some(target),
        Err(e) => {
            tracing::warn!(error = %e, "fast resize failed; using the slow path");
            Some(source.resize(edge, edge, FilterType::Lanczos3))
        }
    }
}

/// The sRGB profile colours are converted to, with its output tables built once.
static SRGB: LazyLock<Box<qcms::Profile>> = LazyLock::new(|| {
    let mut profile = qcms::Profile::new_sRGB();
    profile.precache_output_transform();
    profile
});

/// Converts 8-bit RGB(A) pixels from an embedded ICC profile (a phone's Display P3, Adobe RGB)
/// to sRGB, as libvips' `thumbnail` does with `export_profile=srgb`; run on the resized image,
/// so it costs a fraction of the decode. A profile that cannot be read or converted (or grey
/// pixels) leaves the pixels as they are: they are then taken as sRGB, as before.
pub fn to_srgb(image: &mut DynamicImage, icc_profile: &[u8]) {
    let (kind, pixels) = match image {
        DynamicImage::ImageRgb8(rgb) => (qcms::DataType::RGB8, &mut **rgb),
        DynamicImage::ImageRgba8(rgba) => (qcms::DataType::RGBA8, &mut **rgba),
        _ => return,
    };
    let transform = qcms::Profile::new_from_slice(icc_profile, false).and_then(|profile| {
        qcms::Transform::new(&profile, &SRGB, kind, qcms::Intent::RelativeColorimetric)
    });
    match transform {
        Some(transform) => transform.apply(pixels),
        None => tracing::debug!("ICC profile not usable; pixels taken as sRGB"),
    }
}

/// JPEG for opaque pixels (quality `quality`, 4:2:0 with averaged chroma as libjpeg does, SIMD
/// colour conversion and DCT), PNG (lossless, alpha kept) otherwise.
pub fn encode(image: &DynamicImage, quality: u8) -> Result<Encoded, PipelineError> {
    let mut bytes = Vec::new();
    let content_type = if image.color().has_alpha() {
        image
            .to_rgba8()
            .write_with_encoder(PngEncoder::new(&mut bytes))
            .map_err(|e| {
                tracing::error!(error = %e, "PNG encoding failed");
                PipelineError::Internal
            })?;
        "image/png"
    } else {
        let converted;
        let (pixels, color): (&[u8], _) = match image {
            // No copy for what JPEG takes as it is (every decoded JPEG).
            DynamicImage::ImageRgb8(rgb) => (rgb, ColorType::Rgb),
            DynamicImage::ImageLuma8(grey) => (grey, ColorType::Luma),
            other => {
                converted = other.to_rgb8();
                (&converted, ColorType::Rgb)
            }
        };
        let side = |n: u32| u16::try_from(n).map_err(|_| PipelineError::Internal);
        let mut encoder = jpeg_encoder::Encoder::new(&mut bytes, quality);
        encoder.set_sampling_factor(SamplingFactor::F_2_2);
        encoder.set_chroma_subsampling_method(ChromaSubsamplingMethod::Average);
        encoder
            .encode(pixels, side(image.width())?, side(image.height())?, color)
            .map_err(|e| {
                tracing::error!(error = %e, "JPEG encoding failed");
                PipelineError::Internal
            })?;
        "image/jpeg"
    };
    Ok(Encoded {
        bytes,
        content_type,
        width: image.width(),
        height: image.height(),
    })
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
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for (original, format) in [
            (jpeg(48, 32), ImageFormat::Jpeg),
            (png, ImageFormat::Png),
            (webp, ImageFormat::WebP),
        ] {
            for _ in 0..300 {
                let mut bytes = original.clone();
                match next() % 3 {
                    0 => {
                        for _ in 0..1 + next() % 8 {
                            let at = (next() as usize) % bytes.len();
                            bytes[at] = next() as u8;
                        }
                    }
                    1 => bytes.truncate((next() as usize) % bytes.len()),
                    _ => {
                        let at = (next() as usize) % bytes.len();
                        let junk: Vec<u8> = (0..next() % 64).map(|_| next() as u8).collect();
                        bytes.splice(at..at, junk);
                    }
                }
                let _ = run(&bytes, format, &config, |_| {});
            }
        }
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
