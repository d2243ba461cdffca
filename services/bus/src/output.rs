//! What processing leaves behind, as a result carries it: the stored files of an image (each
//! role in each output format) and the kinds of metadata that were stripped from it.

use std::{fmt, str::FromStr};

use follow_proto::events::v1 as pb;
use serde::{Deserialize, Serialize};

/// What a stored file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputRole {
    /// The processed image, at most the configured long edge.
    Main,
    /// The small preview.
    Preview,
}

impl From<OutputRole> for pb::OutputRole {
    fn from(role: OutputRole) -> Self {
        match role {
            OutputRole::Main => pb::OutputRole::Main,
            OutputRole::Preview => pb::OutputRole::Preview,
        }
    }
}

impl TryFrom<pb::OutputRole> for OutputRole {
    type Error = ();

    fn try_from(role: pb::OutputRole) -> Result<Self, Self::Error> {
        match role {
            pb::OutputRole::Unspecified => Err(()),
            pb::OutputRole::Main => Ok(OutputRole::Main),
            pb::OutputRole::Preview => Ok(OutputRole::Preview),
        }
    }
}

/// The content types an output may have.
pub const OUTPUT_TYPES: [&str; 3] = ["image/jpeg", "image/png", "image/webp"];

/// One stored file of a processed image. Its S3 object's name follows from the image's storage
/// key, the role and the content type (`follow_service::objects::output_key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    pub role: OutputRole,
    /// One of [`OUTPUT_TYPES`].
    pub content_type: String,
    pub width: u32,
    pub height: u32,
    pub byte_size: u64,
}

/// A kind of metadata an original carried and processing removed: a name, never a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MetadataKind {
    /// An EXIF block, whatever it held.
    Exif,
    Gps,
    CaptureTime,
    /// Camera and lens make and model.
    Camera,
    /// Body or lens serial numbers, a unique image id.
    SerialNumber,
    /// Owner or artist name, copyright.
    Owner,
    MakerNotes,
    /// Embedded thumbnails and preview images.
    Thumbnail,
    Xmp,
    Iptc,
    /// Descriptions, comments, free-text chunks.
    Comment,
    Software,
    /// Depth maps, gain maps and other auxiliary images.
    AuxiliaryImage,
}

impl MetadataKind {
    pub const ALL: [MetadataKind; 13] = [
        MetadataKind::Exif,
        MetadataKind::Gps,
        MetadataKind::CaptureTime,
        MetadataKind::Camera,
        MetadataKind::SerialNumber,
        MetadataKind::Owner,
        MetadataKind::MakerNotes,
        MetadataKind::Thumbnail,
        MetadataKind::Xmp,
        MetadataKind::Iptc,
        MetadataKind::Comment,
        MetadataKind::Software,
        MetadataKind::AuxiliaryImage,
    ];

    /// The name on the bus and in the database (`capture_time`).
    pub fn as_str(self) -> &'static str {
        match self {
            MetadataKind::Exif => "exif",
            MetadataKind::Gps => "gps",
            MetadataKind::CaptureTime => "capture_time",
            MetadataKind::Camera => "camera",
            MetadataKind::SerialNumber => "serial_number",
            MetadataKind::Owner => "owner",
            MetadataKind::MakerNotes => "maker_notes",
            MetadataKind::Thumbnail => "thumbnail",
            MetadataKind::Xmp => "xmp",
            MetadataKind::Iptc => "iptc",
            MetadataKind::Comment => "comment",
            MetadataKind::Software => "software",
            MetadataKind::AuxiliaryImage => "auxiliary_image",
        }
    }
}

impl fmt::Display for MetadataKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MetadataKind {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MetadataKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or(())
    }
}

impl From<MetadataKind> for pb::MetadataKind {
    fn from(kind: MetadataKind) -> Self {
        match kind {
            MetadataKind::Exif => pb::MetadataKind::Exif,
            MetadataKind::Gps => pb::MetadataKind::Gps,
            MetadataKind::CaptureTime => pb::MetadataKind::CaptureTime,
            MetadataKind::Camera => pb::MetadataKind::Camera,
            MetadataKind::SerialNumber => pb::MetadataKind::SerialNumber,
            MetadataKind::Owner => pb::MetadataKind::Owner,
            MetadataKind::MakerNotes => pb::MetadataKind::MakerNotes,
            MetadataKind::Thumbnail => pb::MetadataKind::Thumbnail,
            MetadataKind::Xmp => pb::MetadataKind::Xmp,
            MetadataKind::Iptc => pb::MetadataKind::Iptc,
            MetadataKind::Comment => pb::MetadataKind::Comment,
            MetadataKind::Software => pb::MetadataKind::Software,
            MetadataKind::AuxiliaryImage => pb::MetadataKind::AuxiliaryImage,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_name_that_parses_back_and_a_protobuf_value() {
        for kind in MetadataKind::ALL {
            assert_eq!(kind.as_str().parse(), Ok(kind));
            let pb = pb::MetadataKind::from(kind);
            assert_eq!(
                pb.as_str_name().trim_start_matches("METADATA_KIND_"),
                kind.as_str().to_ascii_uppercase()
            );
        }
        assert_eq!("location".parse::<MetadataKind>(), Err(()));
        for role in [OutputRole::Main, OutputRole::Preview] {
            assert_eq!(OutputRole::try_from(pb::OutputRole::from(role)), Ok(role));
        }
    }
}
