//! The CPU part of the pipeline: decode (with limits) → resize to the long edge (never
//! upscaling; Lanczos3) → apply the EXIF orientation to the resized image (never to the
//! full-size one: a phone portrait costs no second full-size buffer) → make a preview → encode. Metadata never survives: the
//! output is encoded from pixels alone (no EXIF/GPS, XMP, IPTC, comments; ICC dropped, sRGB
//! assumed). Opaque images become JPEG; images with alpha keep it as PNG.
//!
//! Pure and synchronous: the service runs it on its bounded blocking pool; `fuzz/` runs it on
//! arbitrary bytes.

use std::io::Cursor;

use fast_image_resize::{
    FilterType as ResizeFilter, PixelType, ResizeAlg, ResizeOptions, Resizer,
    images::{Image, ImageRef},
};
use follow_bus::Stage;
use image::{
    DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits,
    codecs::{jpeg::JpegEncoder, png::PngEncoder},
    imageops::FilterType,
    metadata::Orientation,
};

use follow_bus::ErrorCode;

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
        width,
        height,
    } = decode(bytes, format, config.max_pixels, config.long_edge)?;
    stage(Stage::Processing);
    // The full-size decode is consumed by the main image's resize: peak memory is the decoded
    // image plus a band of rows, never a second full-size buffer. The long edge does not depend
    // on the orientation, so turning the resized image gives the same result, cheaper.
    let mut main = shrunk(image, config.long_edge)?;
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

/// A decoded image, maybe already shrunk, as stored (its EXIF `orientation` not applied yet),
/// and the size of the original after orientation.
#[derive(Debug)]
pub struct Decoded {
    pub image: DynamicImage,
    pub orientation: Orientation,
    pub width: u32,
    pub height: u32,
}

/// Decodes with limits on dimensions and allocation (a lying header cannot make it allocate
/// more than the pixels allowed) and reads the EXIF orientation. The result may be smaller
/// than the original, but never with a long edge below `min_edge` unless the original's is.
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
    let shrinkable = format == ImageFormat::Jpeg
        && width.max(height) >= 2 * u64::from(min_edge)
        && sniff::jpeg_frame(bytes).is_some_and(|frame| frame.is_common());
    let (image, orientation) = if shrinkable {
        decode_jpeg_shrunk(bytes, max_pixels, min_edge)?
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

/// Any accepted format at full size, through `image`'s decoders.
fn decode_full(
    bytes: &[u8],
    format: ImageFormat,
    max_pixels: u64,
) -> Result<(DynamicImage, Orientation), PipelineError> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits.max_alloc = Some(max_alloc(max_pixels));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(invalid)?;
    let orientation = decoder.orientation().map_err(invalid)?;
    let image = DynamicImage::from_decoder(decoder).map_err(invalid)?;
    Ok((image, orientation))
}

/// RGBA16 is the widest buffer a decoder makes: 8 bytes per pixel, plus slack for tables.
fn max_alloc(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(8).saturating_add(64 << 20)
}

/// Shrink-on-load, as libjpeg does for libvips: the IDCT runs at 1/2, 1/4 or 1/8 of the size,
/// the largest reduction that keeps the long edge at `min_edge` or more. The decode is several
/// times faster and its buffers a fraction of the full image; quality is that of a box filter
/// before the final resize. Only for the common frames (`JpegFrame::is_common`), which this
/// decoder handles without surprises.
fn decode_jpeg_shrunk(
    bytes: &[u8],
    max_pixels: u64,
    min_edge: u32,
) -> Result<(DynamicImage, Orientation), PipelineError> {
    let failed = |e: jpeg_decoder::Error| {
        PipelineError::InvalidImage(format!("cannot decode the image: {e}"))
    };
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    decoder
        .set_max_decoding_buffer_size(usize::try_from(max_alloc(max_pixels)).unwrap_or(usize::MAX));
    let edge = u16::try_from(min_edge).unwrap_or(u16::MAX);
    let (width, height) = decoder.scale(edge, edge).map_err(failed)?;
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
    Ok((image, orientation))
}

/// Rows per band of [`shrunk`]'s horizontal pass.
const BAND_ROWS: usize = 64;

/// The resampling of both outputs: Lanczos3, as libvips' `thumbnail` (a box filter only where
/// a JPEG is shrunk on load, in its IDCT).
const RESAMPLING: ResizeAlg = ResizeAlg::Convolution(ResizeFilter::Lanczos3);

/// `image` scaled down to a long edge of `edge` (unchanged when it fits), in the memory it
/// already has. For 8-bit RGB and grey — every JPEG — the separable resize runs its horizontal
/// pass band by band and writes each narrowed band back into the image's own buffer: a narrowed
/// row always lands at or before the source rows still to be read, so nothing unread is
/// overwritten. The buffer is then cut to the narrow image, and the vertical pass makes the
/// result. Other pixel types take [`scaled`].
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
    let bytes = pixel.size();
    let (src_row, dst_row) = (sw as usize * bytes, dw as usize * bytes);
    let mut band = vec![0; dst_row * BAND_ROWS];
    let mut resizer = Resizer::new();
    let options = ResizeOptions::new().resize_alg(RESAMPLING);
    let resized = (0..sh as usize).step_by(BAND_ROWS).try_for_each(|top| {
        let rows = BAND_ROWS.min(sh as usize - top);
        let src = ImageRef::new(
            sw,
            rows as u32,
            &pixels[top * src_row..(top + rows) * src_row],
            pixel,
        )?;
        let mut dst = Image::from_slice_u8(dw, rows as u32, &mut band[..rows * dst_row], pixel)?;
        resizer.resize(&src, &mut dst, &options)?;
        pixels[top * dst_row..(top + rows) * dst_row].copy_from_slice(&band[..rows * dst_row]);
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    drop(band);
    pixels.truncate(sh as usize * dst_row);
    pixels.shrink_to_fit();
    let vertical = resized.and_then(|()| {
        let src = ImageRef::new(dw, sh, &pixels, pixel)?;
        let mut dst = Image::new(dw, dh, pixel);
        resizer.resize(&src, &mut dst, &options)?;
        Ok(dst.into_vec())
    });
    let out = vertical.map_err(|e| {
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
    let shorter =
        |long: u64, short: u64| u32::try_from((short * u64::from(edge) / long).max(1)).unwrap_or(1);
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

/// JPEG for opaque pixels, PNG (lossless, alpha kept) otherwise.
pub fn encode(image: &DynamicImage, quality: u8) -> Result<Encoded, PipelineError> {
    let mut bytes = Vec::new();
    let failed = |e: image::ImageError| {
        tracing::error!(error = %e, "encoding failed");
        PipelineError::Internal
    };
    let content_type = if image.color().has_alpha() {
        image
            .to_rgba8()
            .write_with_encoder(PngEncoder::new(&mut bytes))
            .map_err(failed)?;
        "image/png"
    } else {
        let encoder = JpegEncoder::new_with_quality(&mut bytes, quality);
        match image {
            // No copy for what JPEG takes as it is (every decoded JPEG).
            DynamicImage::ImageRgb8(_) | DynamicImage::ImageLuma8(_) => {
                image.write_with_encoder(encoder)
            }
            other => other.to_rgb8().write_with_encoder(encoder),
        }
        .map_err(failed)?;
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
    use image::{GenericImageView, ImageBuffer, Rgb, Rgba};

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
        // Every row and column different, without hard edges: Lanczos3 overshoots at those, and
        // where its 8-bit intermediate is clipped depends on which pass goes first, a choice
        // `fast_image_resize` makes by size.
        let wave = |t: f32| (127.5 + 120.0 * t.sin()) as u8;
        let source = DynamicImage::ImageRgb8(ImageBuffer::from_fn(1000, 301, |x, y| {
            let (x, y) = (x as f32, y as f32);
            Rgb([wave(x / 23.0), wave(y / 17.0), wave((x + 2.0 * y) / 31.0)])
        }));
        let plain = scaled(&source, 256).unwrap().to_rgb8();
        let banded = shrunk(source.clone(), 256).unwrap().to_rgb8();
        assert_eq!(plain.dimensions(), banded.dimensions());
        let worst = plain
            .as_raw()
            .iter()
            .zip(banded.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(worst <= 2, "largest difference {worst}");
        let grey = DynamicImage::ImageLuma8(source.to_luma8());
        assert_eq!(shrunk(grey, 256).unwrap().dimensions(), (256, 77));
        let small = shrunk(source.clone(), 5000).unwrap();
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
