//! The first look at a body as it arrives: which format its magic bytes say, and whether its
//! header declares more pixels than allowed — both before anything is decoded. Pure functions
//! over bytes, fuzzed by `fuzz/`.

use crate::error::PipelineError;

/// An accepted image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    WebP,
    /// HEIF with HEVC-coded images: what phones call HEIC. `image/heic` and `image/heif` name
    /// the same container and are taken alike.
    Heif,
}

impl Format {
    /// The format of an accepted content type.
    pub fn of_content_type(content_type: &str) -> Option<Self> {
        match content_type {
            "image/jpeg" => Some(Self::Jpeg),
            "image/png" => Some(Self::Png),
            "image/webp" => Some(Self::WebP),
            "image/heic" | "image/heif" => Some(Self::Heif),
            _ => None,
        }
    }

    /// The content type clients are told.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::WebP => "image/webp",
            Self::Heif => "image/heic",
        }
    }

    /// The format for `image`'s decoders; `None` for HEIF, which libheif decodes.
    pub fn image_format(self) -> Option<image::ImageFormat> {
        match self {
            Self::Jpeg => Some(image::ImageFormat::Jpeg),
            Self::Png => Some(image::ImageFormat::Png),
            Self::WebP => Some(image::ImageFormat::WebP),
            Self::Heif => None,
        }
    }
}

/// Bytes needed to tell the format: a HEIF file's `ftyp` box gives its major brand in bytes
/// 8 to 12.
pub const MAGIC_LEN: usize = 12;

/// The major brands of a HEIF file whose primary image is HEVC-coded (`heic`, `heix` and their
/// multi-view and sequence kin) or that says only "HEIF" (`mif1`, `msf1`: the decoder then
/// finds out, and an AVIF declared so is refused as undecodable).
const HEIF_BRANDS: [&[u8; 4]; 10] = [
    b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1",
];

/// The accepted format the magic bytes show, or `INVALID_IMAGE`. `prefix` must hold at least
/// [`MAGIC_LEN`] bytes (or the whole body, if shorter).
pub fn sniff(prefix: &[u8]) -> Result<Format, PipelineError> {
    match prefix {
        [0xFF, 0xD8, 0xFF, ..] => Ok(Format::Jpeg),
        [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, ..] => Ok(Format::Png),
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
        ] => Ok(Format::WebP),
        [_, _, _, _, b'f', b't', b'y', b'p', brand @ ..] if brand.len() >= 4 => {
            if HEIF_BRANDS.iter().any(|heif| brand.starts_with(*heif)) {
                Ok(Format::Heif)
            } else {
                Err(PipelineError::InvalidImage(
                    "the bytes are an ISO media file, but not a HEIF image".into(),
                ))
            }
        }
        _ => Err(PipelineError::InvalidImage(
            "the bytes are not a JPEG, PNG, WebP or HEIC image".into(),
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
pub fn check_header(bytes: &[u8], max_pixels: u64) -> Result<Header, PipelineError> {
    match imagesize::blob_size(bytes) {
        Ok(size) => check_pixels(size, max_pixels),
        Err(_) => Ok(Header::Incomplete),
    }
}

/// [`check_header`] over a whole file, reading only as far as the header needs.
pub fn check_header_of(file: &std::fs::File, max_pixels: u64) -> Result<Header, PipelineError> {
    let reader = std::io::BufReader::with_capacity(16 * 1024, file);
    match imagesize::reader_size(reader) {
        Ok(size) => check_pixels(size, max_pixels),
        Err(_) => Ok(Header::Incomplete),
    }
}

fn check_pixels(size: imagesize::ImageSize, max_pixels: u64) -> Result<Header, PipelineError> {
    check_dimensions(size.width as u64, size.height as u64, max_pixels)
}

/// The pixel limit, for dimensions however they were read (a header here, libheif's primary
/// image in the pipeline).
pub fn check_dimensions(width: u64, height: u64, max_pixels: u64) -> Result<Header, PipelineError> {
    if width == 0 || height == 0 {
        return Err(PipelineError::InvalidImage(
            "the image declares no pixels".into(),
        ));
    }
    if width.saturating_mul(height) > max_pixels {
        return Err(PipelineError::ImageTooLarge(format!(
            "{width}x{height} is more than {max_pixels} pixels"
        )));
    }
    Ok(Header::Dimensions { width, height })
}

/// Scans a JPEG may have. Each progressive scan is a pass over the whole image's coefficients,
/// so a small file of thousands of tiny scans would cost minutes of CPU to decode (libjpeg-turbo
/// suggests a limit of 500 for untrusted input; cameras and encoders write at most ~20).
pub const MAX_JPEG_SCANS: u32 = 500;

/// Refuses a body that stops early, or a JPEG of more than [`MAX_JPEG_SCANS`] scans. JPEG
/// decoders fill a truncated image with grey and call it a success, so a JPEG must end its last
/// scan with the EOI marker: after the last SOS (`FF DA`) an `FF D9` must follow (inside
/// entropy-coded data `FF` is always stuffed, so `FF D9` there is only ever EOI; trailers some
/// cameras append after EOI are fine). PNG and WebP decoders refuse truncated data themselves.
pub fn check_complete(bytes: &[u8], format: Format) -> Result<(), PipelineError> {
    let mut end = JpegEnd::default();
    end.feed(bytes);
    end.check(format)
}

/// [`check_complete`] fed a body piece by piece as it arrives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JpegEnd {
    /// The last byte seen (a marker may straddle two pieces).
    last: Option<u8>,
    /// An `FF D9` came after the last `FF DA` (and there was one).
    ended: bool,
    /// `FF DA` markers seen.
    scans: u32,
}

impl JpegEnd {
    /// Looks at the byte after each `FF` (found by `memchr`: a body's bytes are mostly not
    /// markers).
    pub fn feed(&mut self, piece: &[u8]) {
        let Some(&last) = piece.last() else {
            return;
        };
        if self.last == Some(0xFF) {
            self.after_ff(piece[0]);
        }
        for at in memchr::memchr_iter(0xFF, piece) {
            if let Some(&next) = piece.get(at + 1) {
                self.after_ff(next);
            }
        }
        self.last = Some(last);
    }

    fn after_ff(&mut self, byte: u8) {
        match byte {
            0xDA => {
                self.ended = false;
                self.scans = self.scans.saturating_add(1);
            }
            0xD9 => self.ended = true,
            _ => {}
        }
    }

    /// `Ok` unless the body is a JPEG that did not end or has too many scans.
    pub fn check(&self, format: Format) -> Result<(), PipelineError> {
        if format != Format::Jpeg {
            Ok(())
        } else if self.scans > MAX_JPEG_SCANS {
            Err(PipelineError::InvalidImage(format!(
                "the JPEG has more than {MAX_JPEG_SCANS} scans"
            )))
        } else if !self.ended {
            Err(PipelineError::InvalidImage(
                "the JPEG is truncated (no end of image)".into(),
            ))
        } else {
            Ok(())
        }
    }
}

/// What a JPEG's frame header (SOF) declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegFrame {
    /// The SOF marker's low nibble: 0 baseline, 1 extended, 2 progressive, others rarer.
    pub process: u8,
    pub precision: u8,
    pub components: u8,
}

impl JpegFrame {
    /// An 8-bit Huffman-coded DCT image in grey or YCbCr: the shape every camera writes, and
    /// the one the shrink-on-load decoder is used for.
    pub fn is_common(&self) -> bool {
        matches!(self.process, 0..=2) && self.precision == 8 && matches!(self.components, 1 | 3)
    }
}

/// Walks a JPEG's marker segments up to its frame header. `None` when there is none before
/// the first scan or the segments are malformed: the full decoder then reports why.
pub fn jpeg_frame(bytes: &[u8]) -> Option<JpegFrame> {
    jpeg_segments(bytes).find_map(|(marker, payload)| match (marker, payload) {
        // SOF0..SOF15, but not DHT (C4), JPG (C8) or DAC (CC).
        (0xC0..=0xCF, &[precision, _, _, _, _, components, ..])
            if !matches!(marker, 0xC4 | 0xC8 | 0xCC) =>
        {
            Some(JpegFrame {
                process: marker & 0x0F,
                precision,
                components,
            })
        }
        _ => None,
    })
}

/// A JPEG's marker segments before its first scan, as (marker, payload after the length): the
/// headers and metadata. Ends early at the first malformed segment; a segment cut off by the
/// end of `bytes` comes with what there is of it.
pub fn jpeg_segments(bytes: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut at = 2;
    std::iter::from_fn(move || {
        loop {
            let (&[0xFF, marker], rest) = bytes.get(at..)?.split_first_chunk::<2>()? else {
                return None;
            };
            match marker {
                // Fill bytes before a marker.
                0xFF => at += 1,
                0xDA | 0xD9 => return None,
                // Markers that stand alone, without a length.
                0x01 | 0xD0..=0xD7 => {
                    at += 2;
                    return Some((marker, &[][..]));
                }
                _ => {
                    let [hi, lo, ..] = *rest else { return None };
                    let length = usize::from(u16::from_be_bytes([hi, lo]));
                    let payload = rest.get(2..length.max(2)).unwrap_or(&rest[2..]);
                    at += 2 + length;
                    return Some((marker, payload));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_bytes_decide_and_garbage_is_refused() {
        assert_eq!(
            sniff(b"\xFF\xD8\xFF\xE0\0\x10JFIF\0\x01").unwrap(),
            Format::Jpeg
        );
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n\0\0\0\x0d").unwrap(), Format::Png);
        assert_eq!(sniff(b"RIFF\x24\0\0\0WEBPVP8 ").unwrap(), Format::WebP);
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
    fn jpeg_frames_are_found_past_other_segments_and_garbage_is_none() {
        let mut jpeg =
            b"\xFF\xD8\xFF\xE0\x00\x04ab\xFF\xFF\xC2\x00\x11\x08\x00\x10\x00\x20\x03".to_vec();
        jpeg.extend_from_slice(&[0; 9]);
        assert_eq!(
            jpeg_frame(&jpeg),
            Some(JpegFrame {
                process: 2,
                precision: 8,
                components: 3
            })
        );
        assert!(jpeg_frame(&jpeg).unwrap().is_common());
        for garbage in [
            &b"\xFF\xD8"[..],
            b"\xFF\xD8\xFF\xE0\xFF\xFF",
            b"\xFF\xD8\x00\x00",
            b"\xFF\xD8\xFF\xDA\x00\x02",
            b"\xFF\xD8\xFF\xC0\x00",
        ] {
            assert_eq!(jpeg_frame(garbage), None);
        }
    }

    #[test]
    fn the_end_of_a_jpeg_is_found_across_pieces_and_a_later_scan_reopens_it() {
        let body = b"\xFF\xD8\xFF\xDA scan \xFF\xD9";
        for cut in 0..body.len() {
            let mut end = JpegEnd::default();
            end.feed(&body[..cut]);
            end.feed(&body[cut..]);
            assert!(end.check(Format::Jpeg).is_ok(), "cut at {cut}");
        }
        assert!(check_complete(b"\xFF\xD8\xFF\xD9\xFF\xDA more", Format::Jpeg).is_err());
        assert!(check_complete(b"\xFF\xD8\xFF\xDA", Format::Jpeg).is_err());
        assert!(check_complete(b"\xFF\xD8", Format::Jpeg).is_err());
        assert!(check_complete(b"anything", Format::Png).is_ok());
    }

    #[test]
    fn markers_are_found_as_a_byte_by_byte_reading_finds_them() {
        // Bytes with many `FF`s, `DA`s and `D9`s, cut into pieces of every size up to 7.
        let mut state = 7u32;
        let body: Vec<u8> = (0..4000)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                [0xFF, 0xDA, 0xD9, 0x00, (state >> 16) as u8][(state >> 8) as usize % 5]
            })
            .collect();
        let (mut scans, mut ended) = (0u32, false);
        for pair in body.windows(2) {
            match pair {
                [0xFF, 0xDA] => (scans, ended) = (scans + 1, false),
                [0xFF, 0xD9] => ended = true,
                _ => {}
            }
        }
        for size in 1..8 {
            let mut end = JpegEnd::default();
            body.chunks(size).for_each(|piece| end.feed(piece));
            assert_eq!((end.scans, end.ended), (scans, ended), "pieces of {size}");
        }
    }

    #[test]
    fn a_jpeg_of_too_many_scans_is_refused() {
        let jpeg = |scans: u32| {
            let mut body = b"\xFF\xD8".to_vec();
            for _ in 0..scans {
                body.extend_from_slice(b"\xFF\xDA\x00\x02 scan");
            }
            body.extend_from_slice(b"\xFF\xD9");
            body
        };
        assert!(check_complete(&jpeg(MAX_JPEG_SCANS), Format::Jpeg).is_ok());
        let refused = check_complete(&jpeg(MAX_JPEG_SCANS + 1), Format::Jpeg).unwrap_err();
        assert!(refused.to_string().contains("scans"), "{refused}");
    }

    #[test]
    fn a_tiny_png_declaring_a_pixel_flood_is_refused_from_its_header() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend_from_slice(&60_000u32.to_be_bytes());
        png.extend_from_slice(&60_000u32.to_be_bytes());
        png.extend_from_slice(&[8, 6, 0, 0, 0]);
        assert!(matches!(
            check_header(&png, 50_000_000),
            Err(PipelineError::ImageTooLarge(_))
        ));
        assert_eq!(
            check_header(&png[..10], 50_000_000).unwrap(),
            Header::Incomplete
        );
    }
}
