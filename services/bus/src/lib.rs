//! Everything follow does with Valkey (one node, or a Valkey Cluster), in one place: key names,
//! the two work streams (`image:jobs`, `image:result`, each cut into partitions) and their codec, the one consumer-group machinery around both,
//! progress reporting, the one-time upload guard, and health. Both services use this crate;
//! neither builds a Valkey key or command by hand.
//!
//! The contracts (keys, fields, stages, codes) are those of `docs/architecture.md`:
//!
//! | piece | what it does |
//! |---|---|
//! | [`Valkey`] | one node or a cluster behind one handle; the [`Connection`]s it hands out |
//! | [`keys`] | every key and channel name; the partitions; the two queues ([`keys::RESULTS`], [`keys::JOBS`]) |
//! | [`ImageResult`], [`Job`] + [`codec`] | a stream entry ⇄ one string field per message field ([`StreamMessage`]) |
//! | [`Producer`] | `XADD` of results and jobs (never trims: unacknowledged entries must survive) |
//! | [`Consumer`] | `XREADGROUP` loop over a queue's partition: own pending entries first, then new ones, idle ones of dead consumers (`XAUTOCLAIM`); ack / hand-off / retry / fail / dead-letter, with leases renewed while handling |
//! | [`DeadLetters`] | operators' list / show / replay / drop of a dead stream |
//! | [`Trimmer`] | `XTRIM MINID` just below the oldest entry the group has not acknowledged |
//! | [`ProgressTracker`] | stage hash + TTL + `PUBLISH`, one round trip, never moving backwards |
//! | [`UploadGuard`] | `SET NX EX`: one upload per token |
//! | [`Epochs`] | one marker per partition whose absence says Valkey lost that partition's data |
//! | [`HealthChecker`] | `PING`, does the consumer group exist, a queue's backlog ([`QueueInfo`]) |
//! | [`Backoff`] | the one retry delay |
//! | [`RateLimiter`] | a rate limit shared by every instance (GCRA, one round trip) |
//! | [`Hub`] | one subscriber fanning the partitions' `image:progress:{pN}` out to many watchers |
//! | [`acl`] | the Valkey users: each service may touch only its own keys and commands |
//!
//! Dead-lettered entries keep every original field and gain `dead_reason`, `dead_original_id`,
//! `dead_consumer`, `dead_deliveries`, `dead_failures` and `dead_at`.
#![forbid(unsafe_code)]

mod backoff;
pub mod codec;
mod connection;
mod consumer;
mod dead_letter;
mod epoch;
pub use dead_letter::{DeadEntry, DeadId, DeadLetters};
mod error;
mod guard;
mod health;
mod hub;
mod model;
mod output;
mod producer;
mod progress;
mod rate;
mod reclaimer;
mod resumable;
mod stream;
mod trimmer;

pub use backoff::Backoff;
pub use codec::{DecodeError, StreamMessage};
pub use connection::{Connection, Open, Pushes, Subscriber, Valkey, ValkeyConfig};
pub use consumer::{Consumer, ConsumerConfig, ConsumerStats, Delivery, Handler, Outcome};
pub use epoch::Epochs;
pub use error::BusError;
/// Key names and the ACL users live in `follow-keys`, the bus's ground floor.
pub use follow_keys::{acl, keys};
pub use guard::{GuardOutcome, GuardState, UploadGuard};
pub use health::{Health, HealthChecker, QueueInfo};
pub use hub::{Hub, HubEvent, HubStats, QUEUE as HUB_QUEUE, Subscription};
pub use model::{
    CONTENT_TYPES, Committed, ErrorCode, Failure, ImageResult, Job, Notice, Processed, Progress,
    ResultOutcome, Stage,
};
pub use output::{MetadataKind, OUTPUT_TYPES, OutputFile, OutputRole};
pub use producer::Producer;
pub use progress::{ProgressTracker, Recorded};
pub use rate::RateLimiter;
pub(crate) use reclaimer::Reclaimer;
pub use resumable::{Part, Resumable, Resumables};
pub use stream::{Entry, EntryId};
pub use trimmer::Trimmer;
