//! Expired resumable uploads removed by whichever instance comes first: every
//! `FOLLOW_RESUMABLE_SWEEP_SECS` each instance takes the expired uploads of every partition
//! (each held back from the others for a lease while it works on them), aborts their parts,
//! removes their tails and records and releases their guards. One it could not finish (storage
//! away) comes back after the lease.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::upload::Gateway;

/// How long a sweeper holds the uploads it took before another may take them.
const LEASE: Duration = Duration::from_secs(60);
/// Uploads taken at once from one partition.
const BATCH: usize = 100;

/// The sweeper of expired uploads.
#[derive(Debug, Clone)]
pub struct Sweeper {
    pub gateway: Arc<Gateway>,
}

impl Sweeper {
    /// Sweeps until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let mut every = tokio::time::interval(self.gateway.config.resumable.sweep_every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = every.tick() => {}
            }
            let swept = self.sweep().await;
            if swept > 0 {
                tracing::info!(swept, "expired resumable uploads removed");
            }
        }
    }

    /// One round over every partition; how many uploads were removed.
    async fn sweep(&self) -> usize {
        let gateway = &self.gateway;
        let mut swept = 0;
        for partition in gateway.resumables.partitions().all() {
            let due = match gateway.resumables.due(partition, LEASE, BATCH).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::debug!(error = %e, "expired uploads cannot be looked for now");
                    return swept;
                }
            };
            for image_id in due {
                let record = match gateway.resumables.load(image_id).await {
                    Ok(Some(record)) => record,
                    Ok(None) => {
                        gateway.resumables.remove(image_id).await.ok();
                        continue;
                    }
                    Err(_) => continue,
                };
                // Extended since (clocks differ), or being appended to: left alone.
                if !record.is_expired() || gateway.lock(&record).await.is_err() {
                    continue;
                }
                if gateway.abandon(&record).await.is_ok() {
                    tracing::info!(%image_id, offset = record.offset, "expired upload removed");
                    swept += 1;
                }
            }
        }
        swept
    }
}
