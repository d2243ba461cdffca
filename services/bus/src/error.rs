use crate::DecodeError;

/// What can go wrong talking to the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("valkey: {0}")]
    Valkey(#[from] redis::RedisError),
    #[error("unexpected reply from valkey: {0}")]
    Reply(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Valkey was not reachable for a reason already logged (a lost subscription, say).
    #[error("valkey unavailable: {0}")]
    Unavailable(String),
    /// A request the bus cannot carry out as given (an operator's typo, say).
    #[error("{0}")]
    Invalid(String),
}

impl BusError {
    /// Valkey could not be reached or did not answer in time: worth retrying later, and the
    /// reason for a 503 / `UNAVAILABLE`, as opposed to a bug or a bad request.
    pub fn is_unavailable(&self) -> bool {
        match self {
            BusError::Valkey(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    // A shard fails over, or its slots move: gone in seconds.
                    || e.is_cluster_error()
                    || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
                    || matches!(e.code(), Some("LOADING" | "BUSY" | "MASTERDOWN" | "READONLY"))
            }
            BusError::Unavailable(_) => true,
            _ => false,
        }
    }

    /// The consumer group (or its stream) is gone: Valkey lost its data.
    pub(crate) fn is_nogroup(&self) -> bool {
        matches!(self, BusError::Valkey(e) if e.code() == Some("NOGROUP"))
    }

    pub(crate) fn reply(what: impl Into<String>) -> Self {
        BusError::Reply(what.into())
    }
}
