//! Shared pieces of the bus tests: a real Valkey per test, results, and recording handlers.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use follow_bus::{
    ConsumerConfig, Delivery, ErrorCode, Failure, Handler, ImageResult, Outcome, Processed,
    ResultOutcome, Valkey, ValkeyConfig, keys,
};
use follow_testkit::ValkeyServer;
use tokio::sync::mpsc;
use uuid::Uuid;

pub const WITHIN: Duration = Duration::from_secs(15);

/// The partitions of every test here: one.
pub fn partitions() -> keys::Partitions {
    keys::Partitions::new(1).expect("one partition")
}

/// A fresh Valkey, and a handle on it with one partition (so every image's entries are in
/// `image:result:{p0}`, the stream these tests read).
pub async fn valkey() -> (ValkeyServer, Valkey) {
    let server = ValkeyServer::start().await.expect("valkey-server starts");
    let valkey = Valkey::new(ValkeyConfig {
        partitions: partitions(),
        ..ValkeyConfig::new(server.url())
    })
    .expect("valid url");
    (server, valkey)
}

pub fn processed(image_id: Uuid) -> ImageResult {
    ImageResult {
        image_id,
        outcome: ResultOutcome::Processed(Processed {
            storage_key: format!("images/{image_id}.jpg"),
            preview_key: format!("images/{image_id}.preview.jpg"),
            sha256: "0f".repeat(32),
            content_type: "image/jpeg".into(),
            width: 4000,
            height: 3000,
            processed_width: 2048,
            processed_height: 1536,
            byte_size: 345_678,
            thumbhash: vec![0x1f, 0x08],
            files: Vec::new(),
            stripped_metadata: Vec::new(),
        }),
        produced_at: time::OffsetDateTime::now_utc(),
        processing_ms: 120,
    }
}

pub fn failed(image_id: Uuid) -> ImageResult {
    ImageResult {
        outcome: ResultOutcome::Failed(Failure {
            code: ErrorCode::InvalidImage,
            message: "not an image".into(),
        }),
        ..processed(image_id)
    }
}

/// Quick timings so tests run in milliseconds.
pub fn config(consumer: &str) -> ConsumerConfig {
    ConsumerConfig {
        block: Duration::from_millis(200),
        reclaim_interval: Duration::from_millis(50),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        ..ConsumerConfig::new(keys::RESULTS, consumer)
    }
}

/// Sends every delivery it gets to a channel (tagged with its name), answering with `decide`.
pub struct Recorder<F> {
    pub name: String,
    pub tx: mpsc::UnboundedSender<(String, Delivery<ImageResult>)>,
    pub decide: F,
}

impl<F: FnMut(&Delivery<ImageResult>) -> Outcome + Send> Handler<ImageResult> for Recorder<F> {
    async fn handle(&mut self, batch: &[Delivery<ImageResult>]) -> Vec<Outcome> {
        batch
            .iter()
            .map(|d| {
                let _ = self.tx.send((self.name.clone(), d.clone()));
                (self.decide)(d)
            })
            .collect()
    }
}

/// What a [`Recorder`] saw: (its name, the delivery).
pub type Seen = mpsc::UnboundedReceiver<(String, Delivery<ImageResult>)>;

pub type AckAll = fn(&Delivery<ImageResult>) -> Outcome;

/// A handler that acknowledges everything.
pub fn recorder(name: &str) -> (Recorder<AckAll>, Seen) {
    recorder_with(name, |_| Outcome::Ack)
}

pub fn recorder_with<F: FnMut(&Delivery<ImageResult>) -> Outcome + Send>(
    name: &str,
    decide: F,
) -> (Recorder<F>, Seen) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Recorder {
            name: name.to_owned(),
            tx,
            decide,
        },
        rx,
    )
}

pub async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WITHIN, rx.recv())
        .await
        .expect("a delivery within the deadline")
        .expect("channel open")
}

/// Pending count of the group.
pub async fn pending(conn: &mut redis::aio::MultiplexedConnection, group: &str) -> u64 {
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg("image:result:{p0}")
        .arg(group)
        .query_async(conn)
        .await
        .unwrap();
    match reply {
        redis::Value::Array(parts) => match &parts[0] {
            redis::Value::Int(n) => *n as u64,
            _ => 0,
        },
        _ => 0,
    }
}

/// Entries as raw (id, [(field, value)]) pairs.
pub type RawEntries = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;

pub async fn xlen(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> u64 {
    redis::cmd("XLEN").arg(key).query_async(conn).await.unwrap()
}

/// Reads up to `count` new entries as `consumer` without acknowledging them (a consumer that
/// then dies).
pub async fn read_raw(
    conn: &mut redis::aio::MultiplexedConnection,
    consumer: &str,
    count: usize,
) -> Vec<String> {
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("api-workers")
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg("image:result:{p0}")
        .arg(">")
        .query_async(conn)
        .await
        .unwrap();
    reply
        .keys
        .into_iter()
        .flat_map(|k| k.ids.into_iter().map(|id| id.id))
        .collect()
}

pub async fn create_group(conn: &mut redis::aio::MultiplexedConnection) {
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("image:result:{p0}")
        .arg("api-workers")
        .arg("0")
        .arg("MKSTREAM")
        .query_async::<()>(conn)
        .await
        .unwrap();
}

/// A consumer running in a task.
pub struct Running {
    cancel: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

pub fn spawn<H: Handler<ImageResult> + 'static>(
    consumer: follow_bus::Consumer<ImageResult>,
    mut handler: H,
) -> Running {
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = {
        let cancel = cancel.clone();
        tokio::spawn(async move { consumer.run(&mut handler, cancel).await })
    };
    Running { cancel, task }
}

impl Running {
    /// Cancels and waits for the consumer to return (bounded, so a hang fails the test).
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(WITHIN, self.task)
            .await
            .expect("the consumer stops promptly")
            .expect("the consumer task does not panic");
    }
}

/// Waits until the group has no pending entry.
pub async fn drained(conn: &redis::aio::MultiplexedConnection) {
    follow_testkit::eventually_async(WITHIN, "no pending entry", || {
        let mut conn = conn.clone();
        async move { (pending(&mut conn, "api-workers").await == 0).then_some(()) }
    })
    .await;
}

/// Every entry of a stream, fields as UTF-8 strings.
pub async fn xrange(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Vec<(String, Vec<(String, String)>)> {
    redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap()
}

/// The messages of one image's progress channel (its partition's), subscribed before this
/// returns.
pub async fn subscribe(
    server: &ValkeyServer,
    image_id: Uuid,
) -> impl futures_util::Stream<Item = redis::Msg> + use<> {
    let mut pubsub = redis::Client::open(server.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub
        .subscribe(partitions().progress(image_id))
        .await
        .unwrap();
    pubsub.into_on_message()
}

/// Delivers entry `id` to `consumer` `times` more times (`XCLAIM` without `JUSTID` counts a
/// delivery): a consumer that keeps crashing on it.
pub async fn redeliver(
    conn: &mut redis::aio::MultiplexedConnection,
    consumer: &str,
    id: &str,
    times: usize,
) {
    for _ in 0..times {
        redis::cmd("XCLAIM")
            .arg("image:result:{p0}")
            .arg("api-workers")
            .arg(consumer)
            .arg(0)
            .arg(id)
            .query_async::<redis::Value>(conn)
            .await
            .unwrap();
    }
}
