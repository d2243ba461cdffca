//! The CPU part of the pipeline: decode (with limits) → apply the EXIF orientation → resize to
//! the long edge (never upscaling) and make a preview → encode. Metadata never survives: the
//! output is encoded from pixels alone (no EXIF/GPS, XMP, IPTC, comments; ICC dropped, sRGB
//! assumed). Opaque images become JPEG; images with alpha keep it as PNG.
//!
//! Pure and synchronous: the service runs it on its bounded blocking pool; `fuzz/` runs it on
//! arbitrary bytes.

use std::io::Cursor;

use fast_image_resize::{FilterType as ResizeFilter, ResizeAlg, ResizeOptions, Resizer};
use follow_bus::Stage;
use image::{
    DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits,
    codecs::{jpeg::JpegEncoder, png::PngEncoder},
    imageops::FilterType,
};

use crate::{config::PipelineConfig, error::UploadError, sniff};

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
) -> Result<Output, UploadError> {
    stage(Stage::Decoding);
    let image = decode(bytes, format, config.max_pixels)?;
    stage(Stage::Processing);
    let (width, height) = (image.width(), image.height());
    // The full-size decode is freed as soon as the main image exists: peak memory is the
    // decoded image plus the resizer's buffers, never two full-size copies.
    let main = match scaled(&image, config.long_edge) {
        Some(main) => main,
        None => image,
    };
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

/// Decodes with limits on dimensions and allocation (a lying header cannot make it allocate
/// more than the pixels allowed), then applies the EXIF orientation.
pub fn decode(
    bytes: &[u8],
    format: ImageFormat,
    max_pixels: u64,
) -> Result<DynamicImage, UploadError> {
    let sniffed = sniff::sniff(&bytes[..bytes.len().min(sniff::MAGIC_LEN)])?;
    if sniffed != format {
        return Err(UploadError::InvalidImage(
            "the bytes are not of the declared type".into(),
        ));
    }
    if let sniff::Header::Incomplete = sniff::check_header(bytes, max_pixels)? {
        return Err(UploadError::InvalidImage(
            "the image header is incomplete".into(),
        ));
    }
    sniff::check_complete(bytes, format)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    // RGBA16 is the widest buffer a decoder makes: 8 bytes per pixel.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let invalid = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => UploadError::ImageTooLarge(l.to_string()),
        other => UploadError::InvalidImage(format!("cannot decode the image: {other}")),
    };
    let mut decoder = reader.into_decoder().map_err(invalid)?;
    let orientation = decoder.orientation().map_err(invalid)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(invalid)?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// The image scaled down so its long edge is `edge`, or `None` when it already fits (never
/// upscaled). Resized in 8-bit RGB(A) with SIMD convolution (`fast_image_resize`, alpha
/// premultiplied): no float copies of the image, several times faster than `image`'s resize.
pub fn scaled(image: &DynamicImage, edge: u32) -> Option<DynamicImage> {
    let (w, h) = (u64::from(image.width()), u64::from(image.height()));
    if w.max(h) <= u64::from(edge) {
        return None;
    }
    let shorter =
        |long: u64, short: u64| u32::try_from((short * u64::from(edge) / long).max(1)).unwrap_or(1);
    let (dw, dh) = if w >= h {
        (edge, shorter(w, h))
    } else {
        (shorter(h, w), edge)
    };
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
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(ResizeFilter::Bilinear));
    match Resizer::new().resize(source, &mut target, &options) {
        Ok(()) => Some(target),
        Err(e) => {
            tracing::warn!(error = %e, "fast resize failed; using the slow path");
            Some(source.resize(edge, edge, FilterType::Triangle))
        }
    }
}

/// JPEG for opaque pixels, PNG (lossless, alpha kept) otherwise.
pub fn encode(image: &DynamicImage, quality: u8) -> Result<Encoded, UploadError> {
    let mut bytes = Vec::new();
    let failed = |e: image::ImageError| {
        tracing::error!(error = %e, "encoding failed");
        UploadError::Internal
    };
    let content_type = if image.color().has_alpha() {
        image
            .to_rgba8()
            .write_with_encoder(PngEncoder::new(&mut bytes))
            .map_err(failed)?;
        "image/png"
    } else {
        image
            .to_rgb8()
            .write_with_encoder(JpegEncoder::new_with_quality(&mut bytes, quality))
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
    use image::{ImageBuffer, Rgb, Rgba};

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
                matches!(result, Err(UploadError::InvalidImage(_))),
                "{format:?} {} bytes: {result:?}",
                bytes.len()
            );
        }
    }
}
