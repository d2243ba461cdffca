//! Valkey key and channel names: the single source of them (docs/architecture.md, "Valkey
//! keys").

use std::{fmt::Display, time::Duration};

use uuid::Uuid;

/// A work stream with its consumer group, its dead-letter stream and its failure counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queue {
    /// The stream (`XADD` by producers, `XREADGROUP` by the group).
    pub stream: &'static str,
    pub group: &'static str,
    /// Entries that could not be handled (poison, failed too often). For operators.
    pub dead: &'static str,
    /// Hash: entry id → how many times the handler failed on it (while pending).
    pub failures: &'static str,
}

/// Processing results, written by the gateway, consumed by the API.
pub const RESULTS: Queue = Queue {
    stream: "image:result",
    group: "api-workers",
    dead: "image:result:dead",
    failures: "image:result:failures",
};

/// Accepted uploads (their originals are in S3) waiting to be processed by any gateway.
pub const JOBS: Queue = Queue {
    stream: "image:jobs",
    group: "gateway-workers",
    dead: "image:jobs:dead",
    failures: "image:jobs:failures",
};

/// Stream of processing results ([`RESULTS`]).
pub const RESULT_STREAM: &str = RESULTS.stream;
/// Results that could not be applied ([`RESULTS`]).
pub const DEAD_STREAM: &str = RESULTS.dead;
/// The API's consumer group on [`RESULT_STREAM`].
pub const RESULT_GROUP: &str = RESULTS.group;
/// Pattern matching every progress channel.
pub const PROGRESS_PATTERN: &str = "image:progress:*";

/// How long the status hash lives after its last write.
pub const STATUS_TTL: Duration = Duration::from_secs(3600);

/// `ratelimit:{action}:{subject}`: a rate limit's state (String, expires when idle).
pub fn rate_limit(action: &str, subject: &str) -> String {
    format!("ratelimit:{action}:{subject}")
}

/// `image:upload:{image_id}`: the one-time upload guard (String, `SET NX EX`).
pub fn upload_guard(image_id: impl Display) -> String {
    format!("image:upload:{image_id}")
}

/// `image:status:{image_id}`: the current stage (Hash).
pub fn status(image_id: impl Display) -> String {
    format!("image:status:{image_id}")
}

/// `image:progress:{image_id}`: live stage changes (Pub/Sub channel).
pub fn progress(image_id: impl Display) -> String {
    format!("image:progress:{image_id}")
}

/// The image of a [`progress`] channel; `None` for any other name.
pub fn progress_image(channel: &str) -> Option<Uuid> {
    channel
        .strip_prefix("image:progress:")
        .and_then(|id| Uuid::parse_str(id).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_image_inverts_progress_and_refuses_other_names() {
        let id = Uuid::new_v4();
        assert_eq!(progress_image(&progress(id)), Some(id));
        for other in [
            status(id).as_str(),
            "image:progress:",
            "image:progress:not-a-uuid",
            "image:progress:*",
            "",
        ] {
            assert_eq!(progress_image(other), None, "{other}");
        }
    }
}
