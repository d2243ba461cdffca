//! The CPU part of the pipeline: decode (with limits; a large JPEG shrunk on load by libvips'
//! rule; a progressive one transcoded losslessly to baseline first, so that its coefficients
//! are freed before its pixels exist; HEIF through libheif, upright already) → resize to the
//! long edge (never upscaling; Lanczos3, after a box filter for 4× or more, as libvips) →
//! convert the declared colours (an ICC profile, HEIF code points) to sRGB → apply the EXIF
//! orientation to the resized image (never to the full-size one: a
//! phone portrait costs no second full-size buffer) → make the preview from those pixels →
//! encode. Metadata never survives: the output is encoded from pixels alone (no EXIF/GPS, XMP,
//! IPTC, comments, no profile: the pixels are sRGB); what the original carried is named in the
//! privacy manifest (`metadata`). Opaque images become JPEG (libjpeg-turbo, 4:2:0); images with
//! alpha keep it as PNG; each also as WebP. A ThumbHash of the preview comes with them.
//!
//! Pure and synchronous: the service runs it on its bounded blocking pool; `fuzz/` runs it on
//! arbitrary bytes.
//!
//! One module per stage: `decode` (and `heif`, `metadata`), `resize`, `orient`, `colour`,
//! `encode`, `placeholder`; [`run`] is the sequence.

mod colour;
mod decode;
mod encode;
mod heif;
mod metadata;
mod orient;
mod placeholder;
mod resize;
#[cfg(test)]
mod tests;

use follow_bus::{MetadataKind, OutputRole, Stage};
use image::DynamicImage;

use crate::{config::PipelineConfig, sniff::Format};

pub use crate::error::PipelineError;
pub use colour::{Colours, to_srgb};
pub use decode::{Decoded, decode};
pub use encode::{WEBP_METHOD, encode, encode_webp};
pub use orient::turn_upright;
pub use placeholder::thumbhash;
pub use resize::{scaled, shrunk};

/// One encoded output.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
}

/// One file to store: an encoding of the main image or of the preview.
#[derive(Debug, Clone)]
pub struct Rendition {
    pub role: OutputRole,
    pub encoded: Encoded,
}

#[derive(Debug, Clone)]
pub struct Output {
    /// Dimensions of the original, after orientation.
    pub width: u32,
    pub height: u32,
    /// The main image and the preview as JPEG (or PNG), then as WebP.
    pub files: Vec<Rendition>,
    /// A ThumbHash of the preview: a placeholder of a few dozen bytes.
    pub thumbhash: Vec<u8>,
    /// The kinds of metadata the original carried, none of which the files keep.
    pub stripped_metadata: Vec<MetadataKind>,
}

impl Output {
    /// The file of `role` whose content type is `content_type`.
    pub fn file(&self, role: OutputRole, content_type: &str) -> Option<&Encoded> {
        self.files
            .iter()
            .find(|f| f.role == role && f.encoded.content_type == content_type)
            .map(|f| &f.encoded)
    }

    /// The main image as JPEG or PNG: the one the image's size and type describe.
    pub fn main(&self) -> &Encoded {
        &self.files[0].encoded
    }

    /// The preview as JPEG or PNG.
    pub fn preview(&self) -> &Encoded {
        &self.files[1].encoded
    }
}

/// Runs the pipeline over a whole body, calling `stage` as each stage begins.
pub fn run(
    bytes: &[u8],
    format: Format,
    config: &PipelineConfig,
    mut stage: impl FnMut(Stage),
) -> Result<Output, PipelineError> {
    stage(Stage::Decoding);
    let Decoded {
        image,
        orientation,
        colours,
        metadata,
        width,
        height,
    } = decode(bytes, format, config.max_pixels, config.long_edge)?;
    stage(Stage::Processing);
    let main = main_image(image, colours.as_ref(), orientation, config.long_edge)?;
    let preview = scaled(&main, config.preview_edge);
    let preview = preview.as_ref().unwrap_or(&main);
    stage(Stage::Encoding);
    let rendition = |role, encoded: Result<Encoded, PipelineError>| {
        encoded.map(|encoded| Rendition { role, encoded })
    };
    let files = vec![
        rendition(OutputRole::Main, encode(&main, config.jpeg_quality))?,
        rendition(OutputRole::Preview, encode(preview, config.jpeg_quality))?,
        rendition(
            OutputRole::Main,
            encode_webp(&main, config.webp_quality, WEBP_METHOD),
        )?,
        rendition(
            OutputRole::Preview,
            encode_webp(preview, config.webp_quality, WEBP_METHOD),
        )?,
    ];
    Ok(Output {
        width,
        height,
        files,
        thumbhash: thumbhash(preview),
        stripped_metadata: metadata,
    })
}

/// The main image from a decode: resized to the long edge, in sRGB, upright. The full-size
/// decode is consumed by the resize: peak memory is the decoded image plus a band of rows and
/// the output, never a second full-size buffer. The long edge does not depend on the
/// orientation, so turning the resized image gives the same result, cheaper; so does
/// converting its colours.
pub fn main_image(
    decoded: DynamicImage,
    colours: Option<&Colours>,
    orientation: image::metadata::Orientation,
    long_edge: u32,
) -> Result<DynamicImage, PipelineError> {
    let mut main = shrunk(decoded, long_edge)?;
    if let Some(colours) = colours {
        to_srgb(&mut main, colours);
    }
    turn_upright(&mut main, orientation);
    Ok(main)
}

/// 8-bit grey, RGB or RGBA `pixels` (rows of `width`, no padding) as an image; `None` when
/// they are not that size or of another type.
pub(super) fn from_raw(
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
