//! What a test reads of the platform beside its public answers: the progress channel, the
//! result stream and its pending list, an image's status hash, the next event of a watch.

use follow_proto::{
    api::v1::{self as api, watch_image_status_response::Event},
    events::v1::{ImageProgress, ProgressNotice, Stage, progress_notice},
    prost::Message as _,
    tonic::Streaming,
};
use futures_util::StreamExt as _;
use redis::AsyncCommands as _;
use uuid::Uuid;

use crate::{Platform, keys, user::WAIT};

/// The stages of an image that goes through, in order.
pub const ALL_STAGES: [Stage; 7] = [
    Stage::WaitingUpload,
    Stage::Validating,
    Stage::Decoding,
    Stage::Processing,
    Stage::Encoding,
    Stage::UploadingToStorage,
    Stage::Done,
];

/// Every stage (`ImageProgress`; not the API's commit announcements) published for
/// `image_id`, from the moment of the call.
pub async fn progress_channel(
    platform: &Platform,
    image_id: &str,
) -> impl futures_util::Stream<Item = ImageProgress> + Unpin {
    let messages = platform
        .messages(platform.partitions.progress(uuid(image_id)))
        .await
        .unwrap();
    // The partition's channel carries its other images too.
    let image_id = image_id.to_owned();
    Box::pin(messages.filter_map(move |payload| {
        let notice = ProgressNotice::decode(payload.as_slice()).unwrap().notice;
        let image_id = image_id.clone();
        async move {
            match notice {
                Some(progress_notice::Notice::Progress(p)) if p.image_id == image_id => Some(p),
                _ => None,
            }
        }
    }))
}

/// The gateway's stages (not the API's after-commit announcement) until `done` or `failed`.
pub async fn stages_until_final(
    channel: &mut (impl futures_util::Stream<Item = ImageProgress> + Unpin),
) -> Vec<Stage> {
    let mut stages = Vec::new();
    while let Some(progress) = tokio::time::timeout(WAIT, channel.next()).await.unwrap() {
        stages.push(progress.stage());
        if matches!(progress.stage(), Stage::Done | Stage::Failed) {
            break;
        }
    }
    stages
}

/// An image id of the API's answers as a UUID.
pub fn uuid(image_id: &str) -> Uuid {
    image_id.parse().expect("image ids are UUIDs")
}

/// The `image:result` entries of `image_id` (on its partition).
pub async fn results_of(platform: &Platform, image_id: &str) -> Vec<redis::streams::StreamId> {
    let mut valkey = platform.valkey().await.unwrap();
    let stream = keys::RESULTS.stream(platform.partitions.of(uuid(image_id)));
    let entries: redis::streams::StreamRangeReply = valkey.xrange_all(stream).await.unwrap();
    entries
        .ids
        .into_iter()
        .filter(|e| e.get::<String>("image_id").as_deref() == Some(image_id))
        .collect()
}

/// Entries of `queue` delivered and not acknowledged, on every partition.
pub async fn pending(platform: &Platform, queue: keys::Queue) -> u64 {
    let mut valkey = platform.valkey().await.unwrap();
    let mut pending = 0;
    for partition in platform.partitions.all() {
        let reply: redis::streams::StreamPendingReply = valkey
            .xpending(queue.stream(partition), queue.group)
            .await
            .unwrap_or(redis::streams::StreamPendingReply::Empty);
        pending += reply.count() as u64;
    }
    pending
}

pub async fn pending_results(platform: &Platform) -> u64 {
    pending(platform, keys::RESULTS).await
}

/// Every entry of the results' dead streams.
pub async fn dead_results(platform: &Platform) -> Vec<redis::streams::StreamId> {
    let mut valkey = platform.valkey().await.unwrap();
    let mut dead = Vec::new();
    for partition in platform.partitions.all() {
        let entries: redis::streams::StreamRangeReply = valkey
            .xrange_all(keys::RESULTS.dead(partition))
            .await
            .unwrap();
        dead.extend(entries.ids);
    }
    dead
}

pub async fn status_field(platform: &Platform, image_id: &str, field: &str) -> Option<String> {
    let mut valkey = platform.valkey().await.unwrap();
    valkey
        .hget(platform.partitions.status(uuid(image_id)), field)
        .await
        .unwrap()
}

pub async fn next_event(stream: &mut Streaming<api::WatchImageStatusResponse>) -> Option<Event> {
    loop {
        let message = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("an event within the deadline")
            .unwrap()?;
        match message.event.unwrap() {
            Event::Heartbeat(_) => continue,
            event => return Some(event),
        }
    }
}
