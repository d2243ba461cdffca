//! Encoding from pixels alone: JPEG (libjpeg-turbo, 4:2:0) for opaque images, PNG with alpha;
//! beside either, a WebP of the same pixels (libwebp: lossy for opaque images, lossless with
//! alpha).

use image::{DynamicImage, codecs::png::PngEncoder};

use super::*;
use crate::error::PipelineError;

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

/// libwebp's method (0–6: effort) for the pipeline's WebPs (docs/performance.md, "WebP and
/// AVIF").
pub const WEBP_METHOD: u8 = 4;

/// The same pixels as WebP through libwebp, with `method` (0–6: effort): lossy at `quality`
/// (0–100, libwebp's scale) for opaque images, lossless (as the PNG is) with alpha.
pub fn encode_webp(
    image: &DynamicImage,
    quality: u8,
    method: u8,
) -> Result<Encoded, PipelineError> {
    let mut config = webp::WebPConfig::new().map_err(|()| encoding_failed("WebP", "no config"))?;
    config.method = i32::from(method);
    let (rgba, rgb);
    let encoder = if image.color().has_alpha() {
        config.lossless = 1;
        // For lossless, the effort: libwebp's default.
        config.quality = 75.0;
        rgba = image.to_rgba8();
        webp::Encoder::from_rgba(&rgba, image.width(), image.height())
    } else {
        config.quality = f32::from(quality);
        let pixels: &[u8] = match image {
            DynamicImage::ImageRgb8(pixels) => pixels,
            other => {
                rgb = other.to_rgb8();
                &rgb
            }
        };
        webp::Encoder::from_rgb(pixels, image.width(), image.height())
    };
    let bytes = encoder
        .encode_advanced(&config)
        .map_err(|e| encoding_failed("WebP", format!("{e:?}")))?;
    Ok(Encoded {
        bytes: bytes.to_vec(),
        content_type: "image/webp",
        width: image.width(),
        height: image.height(),
    })
}

/// Encoding our own pixels cannot fail for the client's reasons.
pub(super) fn encoding_failed(format: &str, error: impl std::fmt::Display) -> PipelineError {
    tracing::error!(%error, "{format} encoding failed");
    PipelineError::Internal
}
