//! The checks a body goes through as it arrives, before any decoding: the size cap, its SHA-256,
//! the magic bytes of the declared type, the header's dimensions against the pixel limit, a
//! JPEG's end. Pure: fed chunk by chunk by the receiving loop, which owns the I/O.

use crate::sniff::Format;
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use sha2::{Digest as _, Sha256, digest::common::hazmat::SerializableState as _};

use crate::{
    error::{PipelineError, UploadError},
    sniff::{self, Header, JpegEnd},
};

/// The start of a body kept in memory to find the image's dimensions as it arrives; a header
/// that does not fit (a JPEG with large metadata first) is read from the spool file at the end.
const HEADER_PREFIX: usize = 32 * 1024;

/// What [`BodyCheck::save`] writes.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    /// The SHA-256 state, base64.
    hasher: String,
    prefix: String,
    end: JpegEnd,
    bytes: u64,
    sniffed: bool,
    dimensions: bool,
}

/// One body's checks so far. Every error is the body's fault (it spends the token).
pub(super) struct BodyCheck {
    expected: Format,
    limit: u64,
    max_pixels: u64,
    hasher: Sha256,
    prefix: Vec<u8>,
    end: JpegEnd,
    bytes: u64,
    sniffed: bool,
    dimensions: bool,
}

impl BodyCheck {
    pub(super) fn new(expected: Format, limit: u64, max_pixels: u64) -> Self {
        Self {
            expected,
            limit,
            max_pixels,
            hasher: Sha256::new(),
            prefix: Vec::new(),
            end: JpegEnd::default(),
            bytes: 0,
            sniffed: false,
            dimensions: false,
        }
    }

    /// The bytes fed so far.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Takes the next chunk: refused as soon as the bytes so far show a bad body.
    pub(super) fn feed(&mut self, chunk: &[u8]) -> Result<(), UploadError> {
        self.bytes += chunk.len() as u64;
        if self.bytes > self.limit {
            return Err(UploadError::TooLarge(self.limit));
        }
        self.hasher.update(chunk);
        self.end.feed(chunk);
        if !self.dimensions && self.prefix.len() < HEADER_PREFIX {
            let take = chunk.len().min(HEADER_PREFIX - self.prefix.len());
            self.prefix.extend_from_slice(&chunk[..take]);
            if self.prefix.len() >= sniff::MAGIC_LEN {
                self.sniff()?;
                let header = sniff::check_header(&self.prefix, self.max_pixels)?;
                self.dimensions = matches!(header, Header::Dimensions { .. });
                if self.dimensions {
                    // Checked: the prefix is no longer needed.
                    self.prefix = Vec::new();
                }
            }
        }
        Ok(())
    }

    /// The checks so far, as text to resume them from (another process may take the next bytes).
    pub(super) fn save(&self) -> String {
        let state = Saved {
            hasher: BASE64.encode(self.hasher.serialize()),
            prefix: BASE64.encode(&self.prefix),
            end: self.end,
            bytes: self.bytes,
            sniffed: self.sniffed,
            dimensions: self.dimensions,
        };
        serde_json::to_string(&state).unwrap_or_default()
    }

    /// The checks as [`BodyCheck::save`] left them; `None` if `saved` is not such a state.
    pub(super) fn resume(
        saved: &str,
        expected: Format,
        limit: u64,
        max_pixels: u64,
    ) -> Option<Self> {
        let state: Saved = serde_json::from_str(saved).ok()?;
        let hasher = BASE64.decode(state.hasher).ok()?;
        Some(Self {
            expected,
            limit,
            max_pixels,
            hasher: Sha256::deserialize(hasher.as_slice().try_into().ok()?).ok()?,
            prefix: BASE64.decode(state.prefix).ok()?,
            end: state.end,
            bytes: state.bytes,
            sniffed: state.sniffed,
            dimensions: state.dimensions,
        })
    }

    /// The body has ended: the type of a body shorter than the magic bytes is checked now.
    /// `false` when the header's dimensions are still unknown: they must be read from the whole
    /// body ([`whole_header`]).
    pub(super) fn ended(&mut self) -> Result<bool, UploadError> {
        self.sniff()?;
        Ok(self.dimensions)
    }

    /// The last check (a JPEG's end), then the body's SHA-256 and size.
    pub(super) fn finish(self) -> Result<([u8; 32], u64), UploadError> {
        self.end.check(self.expected)?;
        Ok((self.hasher.finalize().into(), self.bytes))
    }

    fn sniff(&mut self) -> Result<(), UploadError> {
        if !self.sniffed {
            let found = sniff::sniff(&self.prefix)?;
            if found != self.expected {
                return Err(UploadError::BodyTypeMismatch {
                    declared: self.expected.content_type(),
                    found: found.content_type(),
                });
            }
            self.sniffed = true;
        }
        Ok(())
    }
}

/// The verdict on a header read from the whole body: it must give the dimensions.
pub(super) fn whole_header(header: Result<Header, PipelineError>) -> Result<(), UploadError> {
    match header? {
        Header::Dimensions { .. } => Ok(()),
        Header::Incomplete => {
            Err(PipelineError::InvalidImage("the image header is truncated".into()).into())
        }
    }
}
