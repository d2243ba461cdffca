//! Wire formats of the bus.
//!
//! * A result is one stream entry with one string field per `follow.events.v1.ImageResult` field:
//!   numbers in decimal, timestamps RFC 3339 UTC, `status` as `processed` / `failed`, codes as in
//!   docs/architecture.md. Unknown fields are ignored (forward compatible); a missing required field or
//!   a value that does not parse is a [`DecodeError`], which makes the entry poison.
//! * A progress channel message is the protobuf binary encoding of
//!   `follow.events.v1.ProgressNotice`: a stage change, or the API's commit announcement.

use follow_proto::{
    events::v1 as pb,
    prost::Message as _,
    time::{from_timestamp, timestamp},
};
use time::{OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339};
use uuid::Uuid;

use crate::{
    Committed, ErrorCode, Failure, ImageResult, Job, Notice, Processed, Progress, ResultOutcome,
    Stage,
};

/// The schema version this code writes. Readers accept any version and ignore unknown fields.
pub const SCHEMA_VERSION: u32 = 1;

/// Every stream field name, as in the protobuf message.
pub mod field {
    pub const IMAGE_ID: &str = "image_id";
    pub const STATUS: &str = "status";
    pub const SCHEMA_VERSION: &str = "schema_version";
    pub const STORAGE_KEY: &str = "storage_key";
    pub const PREVIEW_KEY: &str = "preview_key";
    pub const SHA256: &str = "sha256";
    pub const CONTENT_TYPE: &str = "content_type";
    pub const WIDTH: &str = "width";
    pub const HEIGHT: &str = "height";
    pub const PROCESSED_WIDTH: &str = "processed_width";
    pub const PROCESSED_HEIGHT: &str = "processed_height";
    pub const BYTE_SIZE: &str = "byte_size";
    pub const ERROR_CODE: &str = "error_code";
    pub const ERROR_MESSAGE: &str = "error_message";
    pub const PRODUCED_AT: &str = "produced_at";
    pub const PROCESSING_MS: &str = "processing_ms";
    /// Job fields (`image:jobs`), beside `image_id`, `schema_version`, `storage_key`,
    /// `content_type`.
    pub const OWNER: &str = "owner";
    pub const ACCEPTED_AT: &str = "accepted_at";

    pub const ALL: [&str; 16] = [
        IMAGE_ID,
        STATUS,
        SCHEMA_VERSION,
        STORAGE_KEY,
        PREVIEW_KEY,
        SHA256,
        CONTENT_TYPE,
        WIDTH,
        HEIGHT,
        PROCESSED_WIDTH,
        PROCESSED_HEIGHT,
        BYTE_SIZE,
        ERROR_CODE,
        ERROR_MESSAGE,
        PRODUCED_AT,
        PROCESSING_MS,
    ];
}

const STATUS_PROCESSED: &str = "processed";
const STATUS_FAILED: &str = "failed";

/// Why bytes from the bus are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("missing required field `{0}`")]
    MissingField(&'static str),
    #[error("field `{field}` is invalid: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("progress payload does not decode: {0}")]
    Payload(String),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::InvalidField {
        field,
        reason: reason.into(),
    }
}

/// RFC 3339 in UTC, as every timestamp on the bus is written.
pub fn format_time(t: OffsetDateTime) -> String {
    t.to_offset(UtcOffset::UTC)
        .format(&Rfc3339)
        .expect("every UTC OffsetDateTime with a four-digit year formats as RFC 3339")
}

pub(crate) fn parse_time(field: &'static str, s: &str) -> Result<OffsetDateTime, DecodeError> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map(|t| t.to_offset(UtcOffset::UTC))
        .map_err(|e| invalid(field, e.to_string()))
}

/// A message carried by a stream: one field per message field, every value a string.
pub trait StreamMessage: Sized {
    /// The stream fields, in a stable order.
    fn to_fields(&self) -> Vec<(&'static str, String)>;

    /// Reads a message from stream fields (name, value) as they came off the wire (or out of a
    /// JSON record): unknown fields are ignored, a missing or bad required one is an error.
    fn from_fields<N, V>(fields: &[(N, V)]) -> Result<Self, DecodeError>
    where
        N: AsRef<[u8]>,
        V: AsRef<[u8]>;

    /// The fields as one JSON object (field names as in the stream): the S3 record of a result.
    fn to_json(&self) -> Vec<u8> {
        let object: serde_json::Map<String, serde_json::Value> = self
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
            .collect();
        serde_json::to_vec(&object).unwrap_or_default()
    }

    /// A message from [`StreamMessage::to_json`]'s output.
    fn from_json(json: &[u8]) -> Result<Self, DecodeError> {
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json)
            .map_err(|e| DecodeError::Payload(format!("not a JSON object: {e}")))?;
        let fields: Vec<(String, String)> = object
            .into_iter()
            .filter_map(|(k, v)| match v {
                serde_json::Value::String(v) => Some((k, v)),
                _ => None,
            })
            .collect();
        Self::from_fields(&fields)
    }
}

impl StreamMessage for Job {
    fn to_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            (field::IMAGE_ID, self.image_id.to_string()),
            (field::SCHEMA_VERSION, SCHEMA_VERSION.to_string()),
            (field::STORAGE_KEY, self.storage_key.clone()),
            (field::CONTENT_TYPE, self.content_type.clone()),
            (field::OWNER, self.owner.clone()),
            (field::ACCEPTED_AT, format_time(self.accepted_at)),
        ]
    }

    fn from_fields<N, V>(fields: &[(N, V)]) -> Result<Self, DecodeError>
    where
        N: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let fields = Fields(fields);
        let _schema_version: u32 = fields.number(field::SCHEMA_VERSION)?;
        Ok(Self {
            image_id: fields.uuid(field::IMAGE_ID)?,
            storage_key: fields.required(field::STORAGE_KEY)?.to_owned(),
            content_type: fields.required(field::CONTENT_TYPE)?.to_owned(),
            owner: fields.required(field::OWNER)?.to_owned(),
            accepted_at: parse_time(field::ACCEPTED_AT, fields.required(field::ACCEPTED_AT)?)?,
        })
    }
}

impl StreamMessage for ImageResult {
    fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            (field::IMAGE_ID, self.image_id.to_string()),
            (
                field::STATUS,
                match self.outcome {
                    ResultOutcome::Processed(_) => STATUS_PROCESSED,
                    ResultOutcome::Failed(_) => STATUS_FAILED,
                }
                .to_owned(),
            ),
            (field::SCHEMA_VERSION, SCHEMA_VERSION.to_string()),
        ];
        match &self.outcome {
            ResultOutcome::Processed(p) => f.extend([
                (field::STORAGE_KEY, p.storage_key.clone()),
                (field::PREVIEW_KEY, p.preview_key.clone()),
                (field::SHA256, p.sha256.clone()),
                (field::CONTENT_TYPE, p.content_type.clone()),
                (field::WIDTH, p.width.to_string()),
                (field::HEIGHT, p.height.to_string()),
                (field::PROCESSED_WIDTH, p.processed_width.to_string()),
                (field::PROCESSED_HEIGHT, p.processed_height.to_string()),
                (field::BYTE_SIZE, p.byte_size.to_string()),
            ]),
            ResultOutcome::Failed(e) => f.extend([
                (field::ERROR_CODE, e.code.as_str().to_owned()),
                (field::ERROR_MESSAGE, e.message.clone()),
            ]),
        }
        f.extend([
            (field::PRODUCED_AT, format_time(self.produced_at)),
            (field::PROCESSING_MS, self.processing_ms.to_string()),
        ]);
        f
    }

    fn from_fields<N, V>(fields: &[(N, V)]) -> Result<Self, DecodeError>
    where
        N: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let fields = Fields(fields);
        let image_id = fields.uuid(field::IMAGE_ID)?;
        let _schema_version: u32 = fields.number(field::SCHEMA_VERSION)?;
        let outcome = match fields.required(field::STATUS)? {
            STATUS_PROCESSED => ResultOutcome::Processed(Processed {
                storage_key: fields.required(field::STORAGE_KEY)?.to_owned(),
                preview_key: fields.required(field::PREVIEW_KEY)?.to_owned(),
                sha256: fields.sha256()?,
                content_type: fields.required(field::CONTENT_TYPE)?.to_owned(),
                width: fields.number(field::WIDTH)?,
                height: fields.number(field::HEIGHT)?,
                processed_width: fields.number(field::PROCESSED_WIDTH)?,
                processed_height: fields.number(field::PROCESSED_HEIGHT)?,
                byte_size: fields.number(field::BYTE_SIZE)?,
            }),
            STATUS_FAILED => ResultOutcome::Failed(Failure {
                code: fields
                    .required(field::ERROR_CODE)?
                    .parse()
                    .map_err(|()| invalid(field::ERROR_CODE, "not a known error code"))?,
                message: fields.required(field::ERROR_MESSAGE)?.to_owned(),
            }),
            other => {
                return Err(invalid(
                    field::STATUS,
                    format!("expected processed or failed, got {other:.32?}"),
                ));
            }
        };
        Ok(Self {
            image_id,
            outcome,
            produced_at: parse_time(field::PRODUCED_AT, fields.required(field::PRODUCED_AT)?)?,
            processing_ms: fields.number(field::PROCESSING_MS)?,
        })
    }
}

/// Field lookup over raw (name, value) pairs; the first occurrence of a name counts.
struct Fields<'a, N, V>(&'a [(N, V)]);

impl<N: AsRef<[u8]>, V: AsRef<[u8]>> Fields<'_, N, V> {
    fn required(&self, name: &'static str) -> Result<&str, DecodeError> {
        let value = self
            .0
            .iter()
            .find(|(n, _)| n.as_ref() == name.as_bytes())
            .map(|(_, v)| v.as_ref())
            .ok_or(DecodeError::MissingField(name))?;
        std::str::from_utf8(value).map_err(|_| invalid(name, "not UTF-8"))
    }

    fn uuid(&self, name: &'static str) -> Result<Uuid, DecodeError> {
        Uuid::parse_str(self.required(name)?).map_err(|e| invalid(name, e.to_string()))
    }

    fn number<T: std::str::FromStr>(&self, name: &'static str) -> Result<T, DecodeError> {
        let text = self.required(name)?;
        text.parse().map_err(|_| {
            invalid(
                name,
                format!("not an unsigned decimal in range: {text:.32?}"),
            )
        })
    }

    fn sha256(&self) -> Result<String, DecodeError> {
        let hex = self.required(field::SHA256)?;
        if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(hex.to_ascii_lowercase())
        } else {
            Err(invalid(field::SHA256, "not 64 hex digits"))
        }
    }
}

impl Notice {
    /// The `image:progress:{id}` payload: `follow.events.v1.ProgressNotice`, protobuf binary.
    pub fn encode(&self) -> Vec<u8> {
        let notice = match self {
            Notice::Progress(p) => {
                let (code, message) = match p.failure() {
                    Some(f) => (pb::ErrorCode::from(f.code), f.message.clone()),
                    None => (pb::ErrorCode::Unspecified, String::new()),
                };
                pb::progress_notice::Notice::Progress(pb::ImageProgress {
                    image_id: p.image_id().to_string(),
                    stage: pb::Stage::from(p.stage()).into(),
                    seq: p.seq(),
                    time: Some(timestamp(p.at())),
                    error_code: code.into(),
                    error_message: message,
                })
            }
            Notice::Committed(c) => pb::progress_notice::Notice::Committed(pb::ImageCommitted {
                image_id: c.image_id.to_string(),
                image: c.image.encode_to_vec(),
                route_ready: c.route_ready,
            }),
        };
        pb::ProgressNotice {
            notice: Some(notice),
        }
        .encode_to_vec()
    }

    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let notice = pb::ProgressNotice::decode(payload)
            .map_err(|e| DecodeError::Payload(e.to_string()))?
            .notice
            .ok_or(DecodeError::MissingField("notice"))?;
        match notice {
            pb::progress_notice::Notice::Progress(p) => decode_progress(p).map(Notice::Progress),
            pb::progress_notice::Notice::Committed(c) => {
                let image_id = Uuid::parse_str(&c.image_id)
                    .map_err(|e| invalid(field::IMAGE_ID, e.to_string()))?;
                let image = follow_proto::api::v1::Image::decode(c.image.as_slice())
                    .map_err(|e| invalid("image", e.to_string()))?;
                if Uuid::parse_str(&image.id).ok() != Some(image_id) {
                    return Err(invalid("image", "the view is of another image"));
                }
                Ok(Notice::Committed(Box::new(Committed {
                    image_id,
                    image,
                    route_ready: c.route_ready,
                })))
            }
        }
    }
}

fn decode_progress(p: pb::ImageProgress) -> Result<Progress, DecodeError> {
    let image_id =
        Uuid::parse_str(&p.image_id).map_err(|e| invalid(field::IMAGE_ID, e.to_string()))?;
    let stage = pb::Stage::try_from(p.stage)
        .ok()
        .and_then(|s| Stage::try_from(s).ok())
        .ok_or_else(|| invalid("stage", format!("unknown stage {}", p.stage)))?;
    let time = p.time.ok_or(DecodeError::MissingField("time"))?;
    let at = from_timestamp(&time).ok_or_else(|| invalid("time", "out of range"))?;
    let progress = match stage {
        Stage::Failed => Progress::failed(
            image_id,
            Failure {
                code: pb::ErrorCode::try_from(p.error_code)
                    .ok()
                    .and_then(|c| ErrorCode::try_from(c).ok())
                    .ok_or_else(|| invalid(field::ERROR_CODE, "missing or unknown"))?,
                message: p.error_message,
            },
        ),
        stage => Progress::reached(image_id, stage),
    };
    if p.seq != progress.seq() {
        return Err(invalid("seq", "does not match the stage"));
    }
    Ok(progress.at_time(at))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use follow_proto::{FILE_DESCRIPTOR_SET, prost::Message as _, prost_types::FileDescriptorSet};
    use time::macros::datetime;

    use super::*;

    fn processed() -> ImageResult {
        ImageResult {
            image_id: Uuid::new_v4(),
            outcome: ResultOutcome::Processed(Processed {
                storage_key: "routes/r/i.jpg".into(),
                preview_key: "routes/r/i.preview.jpg".into(),
                sha256: "ab".repeat(32),
                content_type: "image/jpeg".into(),
                width: 4000,
                height: 3000,
                processed_width: 2048,
                processed_height: 1536,
                byte_size: 123_456,
            }),
            produced_at: datetime!(2026-11-23 10:00:00.123 UTC),
            processing_ms: 842,
        }
    }

    fn failed() -> ImageResult {
        ImageResult {
            outcome: ResultOutcome::Failed(Failure {
                code: ErrorCode::InvalidImage,
                message: "not a JPEG, PNG or WebP".into(),
            }),
            ..processed()
        }
    }

    fn strip(fields: Vec<(&'static str, String)>, name: &str) -> Vec<(&'static str, String)> {
        fields.into_iter().filter(|(n, _)| *n != name).collect()
    }

    #[test]
    fn both_outcomes_round_trip() {
        for r in [processed(), failed()] {
            assert_eq!(ImageResult::from_fields(&r.to_fields()).unwrap(), r);
        }
    }

    #[test]
    fn fields_are_readable_strings() {
        let f = processed().to_fields();
        let get = |n: &str| f.iter().find(|(k, _)| *k == n).unwrap().1.clone();
        assert_eq!(get("status"), "processed");
        assert_eq!(get("schema_version"), "1");
        assert_eq!(get("width"), "4000");
        assert_eq!(get("produced_at"), "2026-11-23T10:00:00.123Z");
        let f = failed().to_fields();
        assert!(f.contains(&("error_code", "INVALID_IMAGE".into())));
        assert!(!f.iter().any(|(k, _)| *k == "storage_key"));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let r = processed();
        let mut f: Vec<(String, Vec<u8>)> = r
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into_bytes()))
            .collect();
        f.push(("added_in_v2".into(), b"whatever".to_vec()));
        f.push(("bin".into(), vec![0xff, 0xfe]));
        assert_eq!(ImageResult::from_fields(&f).unwrap(), r);
    }

    #[test]
    fn a_missing_required_field_is_a_typed_error() {
        for name in [
            "image_id",
            "status",
            "schema_version",
            "produced_at",
            "processing_ms",
            "sha256",
            "width",
        ] {
            let f = strip(processed().to_fields(), name);
            assert_eq!(
                ImageResult::from_fields(&f),
                Err(DecodeError::MissingField(
                    field::ALL.into_iter().find(|n| *n == name).unwrap()
                ))
            );
        }
        for name in ["error_code", "error_message"] {
            let f = strip(failed().to_fields(), name);
            assert!(matches!(
                ImageResult::from_fields(&f),
                Err(DecodeError::MissingField(_))
            ));
        }
    }

    #[test]
    fn hostile_values_are_typed_errors() {
        let cases: [(&str, &[u8]); 10] = [
            ("image_id", b"not-a-uuid"),
            ("status", b"PROCESSED"),
            ("schema_version", b"-1"),
            ("width", b"4294967296"),
            ("byte_size", b"1e9"),
            ("sha256", b"xyz"),
            ("produced_at", b"yesterday"),
            ("processing_ms", b""),
            ("storage_key", &[0xff, 0xfe, 0xfd]),
            ("status", &[0xc3, 0x28]),
        ];
        for (name, value) in cases {
            let f: Vec<(&str, Vec<u8>)> = processed()
                .to_fields()
                .into_iter()
                .map(|(k, v)| {
                    if k == name {
                        (k, value.to_vec())
                    } else {
                        (k, v.into_bytes())
                    }
                })
                .collect();
            assert!(
                matches!(
                    ImageResult::from_fields(&f),
                    Err(DecodeError::InvalidField { .. })
                ),
                "{name} = {value:?}"
            );
        }
        let f: Vec<(&str, &str)> = vec![];
        assert!(ImageResult::from_fields(&f).is_err());
    }

    #[test]
    fn codec_fields_are_exactly_the_protobuf_fields() {
        let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let message = set
            .file
            .iter()
            .filter(|f| f.package() == "follow.events.v1")
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == "ImageResult")
            .unwrap();
        let mut proto: Vec<&str> = message.field.iter().map(|f| f.name()).collect();
        let mut ours = field::ALL.to_vec();
        proto.sort_unstable();
        ours.sort_unstable();
        assert_eq!(ours, proto);
        // And a full round trip writes each of them at least once across the two outcomes.
        let mut written: Vec<&str> = processed()
            .to_fields()
            .into_iter()
            .chain(failed().to_fields())
            .map(|(k, _)| k)
            .collect();
        written.sort_unstable();
        written.dedup();
        assert_eq!(written, ours);
    }

    #[test]
    fn notices_round_trip_and_refuse_garbage() {
        let id = Uuid::new_v4();
        let round_trip = |n: Notice| assert_eq!(Notice::decode(&n.encode()).unwrap(), n);
        round_trip(Notice::Progress(
            Progress::reached(id, Stage::Decoding).at_time(datetime!(2026-11-23 10:00:00.5 UTC)),
        ));
        round_trip(Notice::Progress(
            Progress::failed(
                id,
                Failure {
                    code: ErrorCode::ImageTooLarge,
                    message: "60000x60000".into(),
                },
            )
            .at_time(datetime!(2026-11-23 10:00:01 UTC)),
        ));
        round_trip(Notice::Committed(Box::new(Committed {
            image_id: id,
            image: follow_proto::api::v1::Image {
                id: id.to_string(),
                width: 4000,
                ..Default::default()
            },
            route_ready: true,
        })));
        let unexplained = Progress::reached(id, Stage::Failed);
        assert_eq!(
            unexplained.failure().map(|f| f.code),
            Some(ErrorCode::Internal)
        );
        let foreign = Notice::Committed(Box::new(Committed {
            image_id: id,
            image: follow_proto::api::v1::Image {
                id: Uuid::new_v4().to_string(),
                ..Default::default()
            },
            route_ready: false,
        }));
        assert!(Notice::decode(&foreign.encode()).is_err());
        for garbage in [&b""[..], b"\xff\xff\xff", b"hello world"] {
            assert!(Notice::decode(garbage).is_err());
        }
    }

    #[test]
    fn stages_and_codes_round_trip_through_names_and_protobuf() {
        for s in Stage::ALL {
            assert_eq!(s.as_str().parse::<Stage>(), Ok(s));
            assert_eq!(Stage::try_from(pb::Stage::from(s)), Ok(s));
        }
        assert!(Stage::ALL.windows(2).all(|w| w[0].seq() < w[1].seq()));
        for c in ErrorCode::ALL {
            assert_eq!(c.as_str().parse::<ErrorCode>(), Ok(c));
            assert_eq!(ErrorCode::try_from(pb::ErrorCode::from(c)), Ok(c));
            assert_eq!(
                pb::ErrorCode::from(c).as_str_name(),
                format!("ERROR_CODE_{}", c.as_str())
            );
        }
    }
}
