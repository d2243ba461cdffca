//! Results on their way to `image:result`, in order, none lost while the process lives.
//!
//! The pipeline pushes each result here and moves on; one worker publishes them oldest first.
//! While Valkey is down they wait (the publisher retries with backoff), up to `capacity`: the
//! upload handler refuses new uploads with 503 long before that (Valkey down means no guard),
//! so only in-flight images ever land here during an outage.

use std::{collections::VecDeque, sync::Mutex, time::Duration};

use follow_bus::{ImageResult, Producer};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<VecDeque<ImageResult>>,
    capacity: usize,
    ready: Notify,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            capacity,
            ready: Notify::new(),
        }
    }

    /// Queues a result; `false` (and logged) if the outbox is full, which admission control
    /// is there to prevent.
    pub fn push(&self, result: ImageResult) -> bool {
        let mut queue = self.lock();
        if queue.len() >= self.capacity {
            tracing::error!(image_id = %result.image_id, "outbox full: result dropped");
            return false;
        }
        queue.push_back(result);
        drop(queue);
        self.ready.notify_one();
        true
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<ImageResult>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publishes until `cancel` and the outbox is empty (or cancel comes while Valkey is down:
    /// then what is left is logged, since the process is going away).
    pub async fn publish(&self, mut producer: Producer, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let next = self.lock().front().cloned();
            let Some(result) = next else {
                if cancel.is_cancelled() {
                    return;
                }
                tokio::select! {
                    () = self.ready.notified() => continue,
                    () = cancel.cancelled() => continue,
                }
            };
            match producer.publish(&result).await {
                Ok(id) => {
                    tracing::debug!(image_id = %result.image_id, entry = %id.0, "result published");
                    self.lock().pop_front();
                    backoff = Duration::from_millis(50);
                }
                Err(e) => {
                    tracing::warn!(error = %e, waiting = self.len(), "publishing a result failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = cancel.cancelled() => {
                            // Give a stopping process a last short chance, then report loss.
                            if tokio::time::timeout(Duration::from_secs(5), producer.publish(&result)).await.is_ok_and(|r| r.is_ok()) {
                                self.lock().pop_front();
                                continue;
                            }
                            tracing::error!(lost = self.len(), "shutting down with unpublished results");
                            return;
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
