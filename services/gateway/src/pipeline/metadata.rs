//! The privacy manifest: which kinds of metadata an original carries (all of which the outputs
//! lose, being encoded from pixels alone). Names only: no value is read out beyond telling a tag
//! is there. JPEG segments, PNG chunks and WebP chunks are walked here; HEIF's items are listed
//! by libheif (`heif`). EXIF blocks, wherever they come from, are read by `kamadak-exif`.

use std::collections::BTreeSet;

use exif::{In, Tag};
use follow_bus::MetadataKind;

use crate::sniff::{Format, jpeg_segments};

/// The kinds found, each once, in [`MetadataKind`] order.
#[derive(Debug, Default)]
pub(super) struct Found(BTreeSet<MetadataKind>);

impl Found {
    pub(super) fn add(&mut self, kind: MetadataKind) {
        self.0.insert(kind);
    }

    pub(super) fn into_vec(self) -> Vec<MetadataKind> {
        self.0.into_iter().collect()
    }

    /// An EXIF block (TIFF structure, from its byte-order mark on): `Exif`, and what it holds
    /// that names a kind. A block larger than any camera writes is named `Exif` unread.
    pub(super) fn exif(&mut self, tiff: &[u8]) {
        /// Camera EXIF is at most 64 KiB (a JPEG segment); reading a value copies it, so a
        /// hostile block is not parsed beyond this.
        const MAX_EXIF: usize = 256 * 1024;
        self.add(MetadataKind::Exif);
        if tiff.len() > MAX_EXIF {
            return;
        }
        let mut reader = exif::Reader::new();
        reader.continue_on_error(true);
        let exif = match reader.read_raw(tiff.to_vec()) {
            Ok(exif) => exif,
            Err(exif::Error::PartialResult(partial)) => partial.into_inner().0,
            Err(_) => return,
        };
        for (kind, tags) in EXIF_KINDS {
            if tags
                .iter()
                .any(|&tag| exif.get_field(tag, In::PRIMARY).is_some())
            {
                self.add(*kind);
            }
        }
        if THUMBNAIL_TAGS
            .iter()
            .any(|&tag| exif.get_field(tag, In::THUMBNAIL).is_some())
        {
            self.add(MetadataKind::Thumbnail);
        }
    }
}

/// The tags of the primary image (and its EXIF and GPS directories) that make each kind.
const EXIF_KINDS: &[(MetadataKind, &[Tag])] = &[
    (
        MetadataKind::Gps,
        &[
            Tag::GPSLatitude,
            Tag::GPSLongitude,
            Tag::GPSAltitude,
            Tag::GPSDestLatitude,
            Tag::GPSDestLongitude,
            Tag::GPSAreaInformation,
            Tag::GPSImgDirection,
        ],
    ),
    (
        MetadataKind::CaptureTime,
        &[Tag::DateTime, Tag::DateTimeOriginal, Tag::DateTimeDigitized],
    ),
    (
        MetadataKind::Camera,
        &[Tag::Make, Tag::Model, Tag::LensMake, Tag::LensModel],
    ),
    (
        MetadataKind::SerialNumber,
        &[
            Tag::BodySerialNumber,
            Tag::LensSerialNumber,
            Tag::ImageUniqueID,
        ],
    ),
    (
        MetadataKind::Owner,
        &[Tag::Artist, Tag::Copyright, Tag::CameraOwnerName],
    ),
    (MetadataKind::MakerNotes, &[Tag::MakerNote]),
    (
        MetadataKind::Comment,
        &[Tag::ImageDescription, Tag::UserComment],
    ),
    (MetadataKind::Software, &[Tag::Software]),
];

/// Any of these in the second directory (IFD1) means an embedded thumbnail.
const THUMBNAIL_TAGS: [Tag; 4] = [
    Tag::JPEGInterchangeFormat,
    Tag::Compression,
    Tag::ImageWidth,
    Tag::StripOffsets,
];

/// The kinds of metadata in a JPEG, PNG or WebP file; `Found` empty for HEIF (listed while it
/// is decoded) or a file whose structure ends early (what was walked counts).
pub(super) fn of(bytes: &[u8], format: Format) -> Found {
    let mut found = Found::default();
    match format {
        Format::Jpeg => jpeg(bytes, &mut found),
        Format::Png => png(bytes, &mut found),
        Format::WebP => webp(bytes, &mut found),
        Format::Heif => {}
    }
    found
}

fn jpeg(bytes: &[u8], found: &mut Found) {
    const EXIF: &[u8] = b"Exif\0\0";
    const XMP: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";
    const XMP_EXTENSION: &[u8] = b"http://ns.adobe.com/xmp/extension/\0";
    const PHOTOSHOP: &[u8] = b"Photoshop 3.0\0";
    const MPF: &[u8] = b"MPF\0";
    for (marker, payload) in jpeg_segments(bytes) {
        match marker {
            0xE1 if payload.starts_with(EXIF) => found.exif(&payload[EXIF.len()..]),
            0xE1 if payload.starts_with(XMP) || payload.starts_with(XMP_EXTENSION) => {
                found.add(MetadataKind::Xmp);
            }
            // Photoshop's resources: IPTC's home in a JPEG.
            0xED if payload.starts_with(PHOTOSHOP) => found.add(MetadataKind::Iptc),
            // Multi-Picture Format: further images (previews, gain maps) after the first.
            0xE2 if payload.starts_with(MPF) => found.add(MetadataKind::Thumbnail),
            0xFE => found.add(MetadataKind::Comment),
            _ => {}
        }
    }
}

fn png(bytes: &[u8], found: &mut Found) {
    let Some(mut rest) = bytes.get(8..) else {
        return;
    };
    // Length, type, data, CRC.
    while let Some((head, after)) = rest.split_first_chunk::<8>() {
        let length = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let Some(data) = after.get(..length) else {
            return;
        };
        match &head[4..] {
            b"eXIf" => found.exif(data),
            b"tEXt" | b"zTXt" | b"iTXt" => found.add(png_text_kind(data)),
            b"tIME" => found.add(MetadataKind::CaptureTime),
            b"IEND" => return,
            _ => {}
        }
        rest = after.get(length.saturating_add(4)..).unwrap_or_default();
    }
}

/// What a PNG text chunk is, by its keyword (the bytes before the first NUL).
fn png_text_kind(data: &[u8]) -> MetadataKind {
    let keyword = data.split(|&b| b == 0).next().unwrap_or_default();
    match keyword {
        b"XML:com.adobe.xmp" | b"Raw profile type xmp" => MetadataKind::Xmp,
        b"Raw profile type exif" | b"Raw profile type APP1" => MetadataKind::Exif,
        b"Raw profile type iptc" | b"Raw profile type 8bim" => MetadataKind::Iptc,
        b"Creation Time" => MetadataKind::CaptureTime,
        b"Author" | b"Copyright" => MetadataKind::Owner,
        // The PNG specification's "device used to create the image".
        b"Source" => MetadataKind::Camera,
        b"Software" => MetadataKind::Software,
        _ => MetadataKind::Comment,
    }
}

fn webp(bytes: &[u8], found: &mut Found) {
    let Some(mut rest) = bytes.get(12..) else {
        return;
    };
    // FourCC, little-endian size, data padded to an even length.
    while let Some((head, after)) = rest.split_first_chunk::<8>() {
        let size = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        let Some(data) = after.get(..size) else {
            return;
        };
        match &head[..4] {
            // Some writers keep JPEG's `Exif\0\0` before the TIFF structure.
            b"EXIF" => found.exif(data.strip_prefix(b"Exif\0\0").unwrap_or(data)),
            b"XMP " => found.add(MetadataKind::Xmp),
            _ => {}
        }
        rest = after
            .get(size.saturating_add(size & 1)..)
            .unwrap_or_default();
    }
}
