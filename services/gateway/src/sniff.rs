//! The first look at a body as it arrives: which format its magic bytes say, and whether its
//! header declares more pixels than allowed — both before anything is decoded. Pure functions
//! over bytes, fuzzed by `fuzz/`.

use image::ImageFormat;

use crate::error::UploadError;

/// Formats the gateway accepts, by their content type.
pub fn format_of_content_type(content_type: &str) -> Option<ImageFormat> {
    match content_type {
        "image/jpeg" => Some(ImageFormat::Jpeg),
        "image/png" => Some(ImageFormat::Png),
        "image/webp" => Some(ImageFormat::WebP),
        _ => None,
    }
}

/// Bytes needed to tell the format.
pub const MAGIC_LEN: usize = 12;

/// The accepted format the magic bytes show, or `INVALID_IMAGE`. `prefix` must hold at least
/// [`MAGIC_LEN`] bytes (or the whole body, if shorter).
pub fn sniff(prefix: &[u8]) -> Result<ImageFormat, UploadError> {
    match prefix {
        [0xFF, 0xD8, 0xFF, ..] => Ok(ImageFormat::Jpeg),
        [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, ..] => Ok(ImageFormat::Png),
        [
            b'R',
            b'I',
            b'F',
            b'F',
            _,
            _,
            _,
            _,
            b'W',
            b'E',
            b'B',
            b'P',
            ..,
        ] => Ok(ImageFormat::WebP),
        _ => Err(UploadError::InvalidImage(
            "the bytes are not a JPEG, PNG or WebP image".into(),
        )),
    }
}

/// What the header says so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Not enough bytes yet to find the dimensions.
    Incomplete,
    Dimensions {
        width: u64,
        height: u64,
    },
}

/// Reads the declared dimensions from the bytes received so far and refuses pixel floods.
pub fn check_header(bytes: &[u8], max_pixels: u64) -> Result<Header, UploadError> {
    let Ok(size) = imagesize::blob_size(bytes) else {
        return Ok(Header::Incomplete);
    };
    let (width, height) = (size.width as u64, size.height as u64);
    if width == 0 || height == 0 {
        return Err(UploadError::InvalidImage(
            "the image declares no pixels".into(),
        ));
    }
    if width.saturating_mul(height) > max_pixels {
        return Err(UploadError::ImageTooLarge(format!(
            "{width}x{height} is more than {max_pixels} pixels"
        )));
    }
    Ok(Header::Dimensions { width, height })
}

/// Refuses a body that stops early. JPEG decoders fill a truncated image with grey and call it
/// a success, so a JPEG must end its last scan with the EOI marker: after the last SOS (`FF DA`)
/// an `FF D9` must follow (inside entropy-coded data `FF` is always stuffed, so `FF D9` there is
/// only ever EOI; trailers some cameras append after EOI are fine). PNG and WebP decoders refuse
/// truncated data themselves.
pub fn check_complete(bytes: &[u8], format: ImageFormat) -> Result<(), UploadError> {
    if format != ImageFormat::Jpeg {
        return Ok(());
    }
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let ended = last_scan.is_some_and(|at| bytes[at..].windows(2).any(|w| w == [0xFF, 0xD9]));
    if ended {
        Ok(())
    } else {
        Err(UploadError::InvalidImage(
            "the JPEG is truncated (no end of image)".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_bytes_decide_and_garbage_is_refused() {
        assert_eq!(
            sniff(b"\xFF\xD8\xFF\xE0\0\x10JFIF\0\x01").unwrap(),
            ImageFormat::Jpeg
        );
        assert_eq!(
            sniff(b"\x89PNG\r\n\x1a\n\0\0\0\x0d").unwrap(),
            ImageFormat::Png
        );
        assert_eq!(sniff(b"RIFF\x24\0\0\0WEBPVP8 ").unwrap(), ImageFormat::WebP);
        for garbage in [
            &b""[..],
            b"GIF89a......",
            b"RIFF\0\0\0\0WAVEfmt ",
            b"\xFF\xD8",
            b"hello world!",
        ] {
            assert!(sniff(garbage).is_err());
        }
    }

    #[test]
    fn a_tiny_png_declaring_a_pixel_flood_is_refused_from_its_header() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend_from_slice(&60_000u32.to_be_bytes());
        png.extend_from_slice(&60_000u32.to_be_bytes());
        png.extend_from_slice(&[8, 6, 0, 0, 0]);
        assert!(matches!(
            check_header(&png, 50_000_000),
            Err(UploadError::ImageTooLarge(_))
        ));
        assert_eq!(
            check_header(&png[..10], 50_000_000).unwrap(),
            Header::Incomplete
        );
    }
}
