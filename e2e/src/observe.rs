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

use crate::{Platform, user::WAIT};

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
    let mut pubsub = redis::Client::open(platform.valkey_url.as_str())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub
        .subscribe(format!("image:progress:{image_id}"))
        .await
        .unwrap();
    Box::pin(pubsub.into_on_message().filter_map(|m| async move {
        match ProgressNotice::decode(m.get_payload_bytes())
            .unwrap()
            .notice
        {
            Some(progress_notice::Notice::Progress(p)) => Some(p),
            _ => None,
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

/// Field `name` of the `image:result` entries of `image_id`.
pub async fn results_of(platform: &Platform, image_id: &str) -> Vec<redis::streams::StreamId> {
    let mut valkey = platform.valkey().await.unwrap();
    let entries: redis::streams::StreamRangeReply =
        valkey.xrange_all("image:result").await.unwrap();
    entries
        .ids
        .into_iter()
        .filter(|e| e.get::<String>("image_id").as_deref() == Some(image_id))
        .collect()
}

pub async fn pending_results(platform: &Platform) -> u64 {
    let mut valkey = platform.valkey().await.unwrap();
    let reply: redis::streams::StreamPendingReply = valkey
        .xpending("image:result", "api-workers")
        .await
        .unwrap_or(redis::streams::StreamPendingReply::Empty);
    reply.count() as u64
}

pub async fn status_field(platform: &Platform, image_id: &str, field: &str) -> Option<String> {
    let mut valkey = platform.valkey().await.unwrap();
    valkey
        .hget(format!("image:status:{image_id}"), field)
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
