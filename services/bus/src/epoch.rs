//! Whether Valkey may have lost data: one marker per partition (`image:epoch:{pN}`), set once
//! and never changed, in the partition's slot. A marker that is missing means its partition's
//! data is gone (Valkey restarted empty, a shard came back without its data), or that this is
//! the platform's first start; only the caller that sets it again learns so.

use futures_util::future::try_join_all;

use crate::{BusError, Connection, Valkey, keys::Partitions};

#[derive(Debug, Clone)]
pub struct Epochs {
    conn: Connection,
    partitions: Partitions,
}

impl Epochs {
    pub fn new(valkey: &Valkey) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
            partitions: valkey.partitions(),
        })
    }

    /// Sets every partition's marker that is missing (`SET NX`); returns how many this call
    /// set: partitions whose data may be gone since anyone last looked.
    pub async fn renew(&self) -> Result<usize, BusError> {
        let marks = self.partitions.all().map(|partition| {
            let mut conn = self.conn.clone();
            async move {
                let set: Option<String> = redis::cmd("SET")
                    .arg(partition.epoch())
                    .arg(uuid::Uuid::new_v4().to_string())
                    .arg("NX")
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, BusError>(set.is_some())
            }
        });
        Ok(try_join_all(marks)
            .await?
            .into_iter()
            .filter(|set| *set)
            .count())
    }
}
