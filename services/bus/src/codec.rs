//! Wire formats of the bus.
//!
//! * A result is one stream entry with one string field per `follow.events.v1.ImageResult` field:
//!   numbers in decimal, bytes in base64, timestamps RFC 3339 UTC, `status` as `processed` /
//!   `failed`, codes as in docs/architecture.md. Unknown fields are ignored (forward compatible);
//!   a missing required field or a value that does not parse is a [`DecodeError`], which makes
//!   the entry poison.
//! * A progress channel message is the protobuf binary encoding of
//!   `follow.events.v1.ProgressNotice`: a stage change, or the API's commit announcement.

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use follow_proto::{
    events::v1 as pb,
    prost::Message as _,
    time::{from_timestamp, timestamp},
};
use time::{OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339};
use uuid::Uuid;

use crate::{
    Committed, ErrorCode, Failure, ImageResult, Job, MetadataKind, Notice, OUTPUT_TYPES,
    OutputFile, Processed, Progress, ResultOutcome, Stage,
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
    pub const THUMBHASH: &str = "thumbhash";
    pub const FILES: &str = "files";
    pub const STRIPPED_METADATA: &str = "stripped_metadata";
    /// Job fields (`image:jobs`), beside `image_id`, `schema_version`, `storage_key`,
    /// `content_type`.
    pub const OWNER: &str = "owner";
    pub const ACCEPTED_AT: &str = "accepted_at";

    pub const ALL: [&str; 19] = [
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
        THUMBHASH,
        FILES,
        STRIPPED_METADATA,
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
        .into_iter()
        .chain(self.sha256.clone().map(|sha| (field::SHA256, sha)))
        .collect()
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
            sha256: match fields.required(field::SHA256) {
                Ok(_) => Some(fields.sha256()?),
                Err(_) => None,
            },
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
                (field::THUMBHASH, BASE64.encode(&p.thumbhash)),
                (field::FILES, files_text(&p.files)),
                (field::STRIPPED_METADATA, kinds_text(&p.stripped_metadata)),
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
                thumbhash: fields.thumbhash()?,
                files: fields.files()?,
                stripped_metadata: fields.stripped_metadata()?,
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

/// The `files` field's text: a JSON array (also how the database keeps it).
pub fn files_text(files: &[OutputFile]) -> String {
    serde_json::to_string(files).unwrap_or_else(|_| "[]".into())
}

/// The `stripped_metadata` field's text: the names joined by commas.
pub fn kinds_text(kinds: &[MetadataKind]) -> String {
    kinds
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(",")
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

    /// Optional: entries written before placeholders existed have none. A ThumbHash is at
    /// most a few dozen bytes.
    fn thumbhash(&self) -> Result<Vec<u8>, DecodeError> {
        const MAX: usize = 64;
        match self.required(field::THUMBHASH) {
            Ok(text) if text.len() > MAX.div_ceil(3) * 4 => {
                Err(invalid(field::THUMBHASH, "longer than a ThumbHash"))
            }
            Ok(text) => BASE64
                .decode(text)
                .map_err(|_| invalid(field::THUMBHASH, "not base64")),
            Err(DecodeError::MissingField(_)) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Optional: entries written before the list existed have none. A few files of the types
    /// outputs have, each role and type once.
    fn files(&self) -> Result<Vec<OutputFile>, DecodeError> {
        const MAX_FILES: usize = 8;
        let json = match self.required(field::FILES) {
            Ok(json) => json,
            Err(DecodeError::MissingField(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        if json.len() > MAX_FILES * 128 {
            return Err(invalid(field::FILES, "longer than a list of files"));
        }
        let files: Vec<OutputFile> = serde_json::from_str(json)
            .map_err(|e| invalid(field::FILES, format!("not a list of files: {e}")))?;
        let mut seen = std::collections::HashSet::new();
        for file in &files {
            if !OUTPUT_TYPES.contains(&file.content_type.as_str()) {
                return Err(invalid(field::FILES, "a file of a type outputs never have"));
            }
            if !seen.insert((file.role, file.content_type.as_str())) {
                return Err(invalid(field::FILES, "a role and type listed twice"));
            }
        }
        Ok(files)
    }

    /// Optional: entries written before manifests existed have none. Names this version does
    /// not know (a newer gateway's) are left out.
    fn stripped_metadata(&self) -> Result<Vec<MetadataKind>, DecodeError> {
        let names = match self.required(field::STRIPPED_METADATA) {
            Ok(names) => names,
            Err(DecodeError::MissingField(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut kinds: Vec<MetadataKind> = names
            .split(',')
            .filter_map(|name| name.parse().ok())
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        Ok(kinds)
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
mod tests;
