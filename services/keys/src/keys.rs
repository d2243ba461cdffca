//! Valkey key and channel names: the single source of them (docs/architecture.md, "Valkey
//! keys").
//!
//! Everything about an image lives in one **partition** of [`Partitions`] (chosen from its id),
//! and every key of a partition carries its hash tag `{pN}`: on a Valkey Cluster they share one
//! hash slot, so the one-slot rule of scripts and `MULTI` holds for everything the platform does
//! to one image (its guard and its job, its status hash and its progress channel, a job's
//! acknowledgement and the result it hands off). On a single Valkey the tags change nothing.

use std::{fmt::Display, num::NonZeroU16, str::FromStr, time::Duration};

use uuid::Uuid;

/// How many partitions the work streams are cut into: every service of one platform must use
/// the same count (changing it means draining the streams first: docs/operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitions(NonZeroU16);

impl Partitions {
    /// The most partitions a platform may have.
    pub const MAX: u16 = 1024;
    pub const DEFAULT: Self = Self::new_const(16);

    /// `count` partitions, in a constant; panics (at compile time) unless `1..=MAX`.
    pub const fn new_const(count: u16) -> Self {
        assert!(count >= 1 && count <= Self::MAX, "1 to MAX partitions");
        match NonZeroU16::new(count) {
            Some(n) => Self(n),
            None => panic!("not zero"),
        }
    }

    /// `None` unless `1..=MAX`.
    pub fn new(count: u16) -> Option<Self> {
        NonZeroU16::new(count)
            .filter(|n| n.get() <= Self::MAX)
            .map(Self)
    }

    pub fn count(self) -> u16 {
        self.0.get()
    }

    /// The partition of `image_id`: its 128 bits modulo the count (the low bits of a v4 or v7
    /// UUID are random, so images spread evenly).
    pub fn of(self, image_id: Uuid) -> Partition {
        let index = image_id.as_u128() % u128::from(self.0.get());
        Partition(u16::try_from(index).unwrap_or_default())
    }

    /// The partition with this index, if there is one.
    pub fn get(self, index: u16) -> Option<Partition> {
        (index < self.0.get()).then_some(Partition(index))
    }

    /// Every partition, in order.
    pub fn all(self) -> impl Iterator<Item = Partition> + Clone {
        (0..self.0.get()).map(Partition)
    }

    /// `image:upload:{pN}:{image_id}`: the one-time upload guard (String, `SET NX EX`).
    pub fn upload_guard(self, image_id: Uuid) -> String {
        format!("image:upload:{}:{image_id}", self.of(image_id).tag())
    }

    /// `image:status:{pN}:{image_id}`: the current stage (Hash).
    pub fn status(self, image_id: Uuid) -> String {
        format!("image:status:{}:{image_id}", self.of(image_id).tag())
    }

    /// `image:resumable:{pN}:{image_id}`: the state of a resumable upload of the image
    /// (String, JSON; expires with the upload).
    pub fn resumable(self, image_id: Uuid) -> String {
        format!("image:resumable:{}:{image_id}", self.of(image_id).tag())
    }

    /// `image:resumable:{pN}:{image_id}:lock`: who is appending to the image's resumable
    /// upload (String, `SET NX PX`: a lease its gateway renews while bytes come).
    pub fn resumable_lock(self, image_id: Uuid) -> String {
        format!("{}:lock", self.resumable(image_id))
    }

    /// The progress channel `image_id`'s stage changes are published on: its partition's.
    pub fn progress(self, image_id: Uuid) -> String {
        self.of(image_id).progress()
    }
}

impl Default for Partitions {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl FromStr for Partitions {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<u16>()
            .ok()
            .and_then(Self::new)
            .ok_or_else(|| format!("`{s}` is not a partition count from 1 to {}", Self::MAX))
    }
}

impl Display for Partitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One partition: a hash tag `{pN}` shared by its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition(u16);

impl Partition {
    pub fn index(self) -> u16 {
        self.0
    }

    /// `{pN}`.
    pub fn tag(self) -> String {
        format!("{{p{}}}", self.0)
    }

    /// `image:epoch:{pN}`: a marker set once, whose absence says the partition lost its data.
    pub fn epoch(self) -> String {
        format!("image:epoch:{}", self.tag())
    }

    /// `image:resumable:expiries:{pN}`: the partition's resumable uploads by expiry (Sorted
    /// Set: image id → Unix ms); the sweepers of expired uploads take them from here.
    pub fn resumable_expiries(self) -> String {
        format!("image:resumable:expiries:{}", self.tag())
    }

    /// `image:progress:{pN}`: live stage changes of the partition's images (a sharded Pub/Sub
    /// channel on a cluster).
    pub fn progress(self) -> String {
        format!("image:progress:{}", self.tag())
    }
}

impl Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p{}", self.0)
    }
}

/// A work stream with its consumer group, its dead-letter stream and its failure counts, one of
/// each per partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queue {
    /// The streams' name before the partition's tag.
    pub name: &'static str,
    pub group: &'static str,
}

impl Queue {
    /// A partition's stream (`XADD` by producers, `XREADGROUP` by the group).
    pub fn stream(self, partition: Partition) -> String {
        format!("{}:{}", self.name, partition.tag())
    }

    /// Entries of a partition that could not be handled (poison, failed too often). For
    /// operators.
    pub fn dead(self, partition: Partition) -> String {
        format!("{}:dead:{}", self.name, partition.tag())
    }

    /// Hash: entry id → how many times the handler failed on it (while pending).
    pub fn failures(self, partition: Partition) -> String {
        format!("{}:failures:{}", self.name, partition.tag())
    }

    /// The keys of one partition of this queue.
    pub fn at(self, partition: Partition) -> QueuePartition {
        QueuePartition {
            queue: self,
            partition,
            stream: self.stream(partition),
            dead: self.dead(partition),
            failures: self.failures(partition),
        }
    }

    /// A pattern matching every key of this queue (for the ACL).
    pub fn pattern(self) -> String {
        format!("{}:*", self.name)
    }

    /// A pattern matching every partition's stream and nothing else of this queue.
    pub fn streams_pattern(self) -> String {
        format!("{}:{{p*", self.name)
    }
}

/// One partition of a [`Queue`]: its stream, dead stream and failure counts (one hash slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePartition {
    pub queue: Queue,
    pub partition: Partition,
    pub stream: String,
    pub dead: String,
    pub failures: String,
}

impl QueuePartition {
    pub fn group(&self) -> &'static str {
        self.queue.group
    }
}

/// Processing results, written by the gateway, consumed by the API.
pub const RESULTS: Queue = Queue {
    name: "image:result",
    group: "api-workers",
};

/// Accepted uploads (their originals are in S3) waiting to be processed by any gateway.
pub const JOBS: Queue = Queue {
    name: "image:jobs",
    group: "gateway-workers",
};

/// Pattern matching every progress channel.
pub const PROGRESS_PATTERN: &str = "image:progress:*";
/// Pattern matching every upload guard.
pub const UPLOAD_GUARD_PATTERN: &str = "image:upload:*";
/// The partition count the platform's streams are cut into, set by the first service to start
/// (String): a service configured with another count refuses to start.
pub const PARTITIONS: &str = "image:partitions";

/// Pattern matching every partition's epoch marker.
pub const EPOCH_PATTERN: &str = "image:epoch:*";
/// Pattern matching every status hash.
pub const STATUS_PATTERN: &str = "image:status:*";

/// Pattern matching every key of resumable uploads.
pub const RESUMABLE_PATTERN: &str = "image:resumable:*";

/// `image:resumable:user:{h}`: the open resumable uploads of one user (Sorted Set: image id →
/// expiry, Unix ms), `h` the first 16 bytes of the SHA-256 of the user's `sub`, in hex (its own
/// hash slot: any `sub` fits).
pub fn resumable_of_user(sub: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(sub.as_bytes());
    format!("image:resumable:user:{{{}}}", hex::encode(&digest[..16]))
}

/// How long the status hash lives after its last write.
pub const STATUS_TTL: Duration = Duration::from_secs(3600);

/// `ratelimit:{action}:{subject}`: a rate limit's state (String, expires when idle).
pub fn rate_limit(action: &str, subject: &str) -> String {
    format!("ratelimit:{action}:{subject}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_images_keys_and_its_queues_share_its_partitions_tag() {
        let partitions = Partitions::new(7).unwrap();
        for _ in 0..100 {
            let id = Uuid::new_v4();
            let tag = partitions.of(id).tag();
            assert!(partitions.of(id).index() < 7);
            for key in [
                partitions.upload_guard(id),
                partitions.status(id),
                partitions.resumable(id),
                partitions.resumable_lock(id),
                partitions.of(id).resumable_expiries(),
                partitions.progress(id),
                JOBS.stream(partitions.of(id)),
                RESULTS.stream(partitions.of(id)),
                RESULTS.dead(partitions.of(id)),
                JOBS.failures(partitions.of(id)),
            ] {
                assert_eq!(key.matches('{').count(), 1, "{key}");
                assert!(key.contains(&tag), "{key} has {tag}");
            }
        }
    }

    #[test]
    fn images_spread_over_every_partition() {
        let partitions = Partitions::DEFAULT;
        let mut seen = [0_u32; 16];
        for _ in 0..1600 {
            seen[usize::from(partitions.of(Uuid::now_v7()).index())] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn a_partition_count_is_from_1_to_the_maximum() {
        assert_eq!("16".parse::<Partitions>(), Ok(Partitions::DEFAULT));
        for bad in ["0", "1025", "-1", "x", ""] {
            assert!(bad.parse::<Partitions>().is_err(), "{bad}");
        }
    }
}
