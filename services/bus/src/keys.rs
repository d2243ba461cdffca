//! Valkey key and channel names: the single source of them (ARCHITECTURE.md, "Valkey keys").

use std::{fmt::Display, time::Duration};

use uuid::Uuid;

/// Stream of processing results, written by the gateway, consumed by the API.
pub const RESULT_STREAM: &str = "image:result";
/// Results that could not be applied (poison, delivered too often). For operators.
pub const DEAD_STREAM: &str = "image:result:dead";
/// The API's consumer group on [`RESULT_STREAM`].
pub const RESULT_GROUP: &str = "api-workers";
/// Pattern matching every progress channel.
pub const PROGRESS_PATTERN: &str = "image:progress:*";

/// How long the status hash lives after its last write.
pub const STATUS_TTL: Duration = Duration::from_secs(3600);
/// How long the one-time upload guard is held.
pub const UPLOAD_GUARD_TTL: Duration = Duration::from_secs(3600);

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
