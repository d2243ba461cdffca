use redis::aio::ConnectionManager;

use crate::{BusError, EntryId, ImageResult, Valkey, keys};

/// Publishes results to `image:result`.
///
/// Never trims (no `MAXLEN`): an entry the API has not acknowledged must survive, however long
/// the API is away. The [`crate::Trimmer`] on the consumer side bounds the stream safely.
#[derive(Clone)]
pub struct Producer {
    conn: ConnectionManager,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").finish_non_exhaustive()
    }
}

impl Producer {
    pub fn new(valkey: &Valkey) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
        })
    }

    pub async fn publish(&mut self, result: &ImageResult) -> Result<EntryId, BusError> {
        let id: String = redis::cmd("XADD")
            .arg(keys::RESULT_STREAM)
            .arg("*")
            .arg(result.to_fields())
            .query_async(&mut self.conn)
            .await?;
        Ok(EntryId(id))
    }
}
