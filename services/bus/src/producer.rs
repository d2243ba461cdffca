use redis::aio::ConnectionManager;

use crate::{BusError, EntryId, ImageResult, Valkey, keys};

/// Publishes results to `image:result`.
///
/// Never trims (no `MAXLEN`): an entry the API has not acknowledged must survive, however long
/// the API is away. The [`crate::Trimmer`] on the consumer side bounds the stream safely.
#[derive(Clone, Debug)]
pub struct Producer {
    conn: ConnectionManager,
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
