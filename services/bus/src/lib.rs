//! Everything follow does with Valkey, in one place: key names, the `image:result` stream and its
//! codec, the consumer-group machinery around it, progress reporting, the one-time upload guard,
//! and health. Both services use this crate; neither builds a Valkey key or command by hand.
//!
//! The contracts (keys, fields, stages, codes) are those of `shared/ARCHITECTURE.md`:
//!
//! | piece | what it does |
//! |---|---|
//! | [`keys`] | every key and channel name |
//! | [`ImageResult`] + [`codec`] | the stream entry ⇄ one string field per `follow.events.v1.ImageResult` field |
//! | [`Producer`] | `XADD image:result` (never trims: unacknowledged entries must survive) |
//! | [`Consumer`] | `XREADGROUP` loop: own pending entries first, then new ones; ack / retry / dead-letter |
//! | [`Reclaimer`] | `XAUTOCLAIM` of entries idle in other (dead) consumers; dead-letters the over-delivered |
//! | [`Trimmer`] | `XTRIM MINID` just below the oldest entry the group has not acknowledged |
//! | [`ProgressTracker`] | stage hash + TTL + `PUBLISH`, one round trip, never moving backwards |
//! | [`UploadGuard`] | `SET NX EX`: one upload per token |
//! | [`HealthChecker`] | `PING` + does the consumer group exist (and its backlog) |
//! | [`Hub`] | one pub/sub connection fanning `image:progress:{id}` out to many watchers |
//!
//! Dead-lettered entries keep every original field and gain `dead_reason`, `dead_original_id`,
//! `dead_consumer`, `dead_deliveries` and `dead_at`.
#![forbid(unsafe_code)]

pub mod codec;
mod connection;
mod consumer;
mod dead_letter;
mod error;
mod guard;
mod health;
mod hub;
pub mod keys;
mod model;
mod producer;
mod progress;
mod reclaimer;
mod stream;
mod trimmer;

pub use codec::DecodeError;
pub use connection::{Valkey, ValkeyConfig};
pub use consumer::{Consumer, ConsumerConfig, ConsumerStats, Delivery, Handler, Outcome};
pub use error::BusError;
pub use guard::{GuardOutcome, UploadGuard};
pub use health::{GroupInfo, Health, HealthChecker};
pub use hub::{Channels, Hub, HubEvent, HubStats, QUEUE as HUB_QUEUE, Subscription};
pub use model::{ErrorCode, Failure, ImageResult, Processed, Progress, ResultOutcome, Stage};
pub use producer::Producer;
pub use progress::{ProgressTracker, Recorded, StatusSnapshot};
pub use reclaimer::{ReclaimPage, Reclaimer};
pub use stream::{Entry, EntryId};
pub use trimmer::Trimmer;
