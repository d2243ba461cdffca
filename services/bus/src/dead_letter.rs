//! Moving an entry to `image:result:dead`, shared by the consumer and the reclaimer.

use redis::aio::ConnectionManager;

use crate::{BusError, Entry, codec::format_time, keys};

/// The dead stream is for operators to inspect; it is capped (approximately) so a flood of
/// poison cannot grow Valkey's memory without bound.
pub(crate) const DEAD_STREAM_MAX_LEN: usize = 100_000;

/// Copies `entry` with the reason to the dead stream, then acknowledges it, in one `MULTI`: the
/// `XADD` comes first so an entry is never acknowledged without having been kept.
pub(crate) async fn dead_letter(
    conn: &mut ConnectionManager,
    group: &str,
    consumer: &str,
    entry: &Entry,
    deliveries: u64,
    reason: &str,
) -> Result<(), BusError> {
    let mut xadd = redis::cmd("XADD");
    xadd.arg(keys::DEAD_STREAM)
        .arg("MAXLEN")
        .arg("~")
        .arg(DEAD_STREAM_MAX_LEN)
        .arg("*");
    for (name, value) in entry.fields.iter().flatten() {
        xadd.arg(name.as_slice()).arg(value.as_slice());
    }
    xadd.arg("dead_reason")
        .arg(reason)
        .arg("dead_original_id")
        .arg(entry.id.0.as_str())
        .arg("dead_consumer")
        .arg(consumer)
        .arg("dead_deliveries")
        .arg(deliveries)
        .arg("dead_at")
        .arg(format_time(time::OffsetDateTime::now_utc()));
    redis::pipe()
        .atomic()
        .add_command(xadd)
        .ignore()
        .cmd("XACK")
        .arg(keys::RESULT_STREAM)
        .arg(group)
        .arg(entry.id.0.as_str())
        .ignore()
        .query_async::<()>(conn)
        .await?;
    tracing::warn!(entry_id = %entry.id, deliveries, reason, "result dead-lettered");
    Ok(())
}

/// Dead-letters the entries delivered more than `max_deliveries` times; returns the others and
/// how many were dead-lettered.
pub(crate) async fn drop_over_delivered(
    conn: &mut ConnectionManager,
    group: &str,
    consumer: &str,
    max_deliveries: u64,
    entries: Vec<(Entry, u64)>,
) -> Result<(Vec<(Entry, u64)>, u64), BusError> {
    let mut keep = Vec::with_capacity(entries.len());
    let mut dropped = 0;
    for (entry, deliveries) in entries {
        if deliveries > max_deliveries {
            let reason = format!("delivered {deliveries} times (more than {max_deliveries})");
            dead_letter(conn, group, consumer, &entry, deliveries, &reason).await?;
            dropped += 1;
        } else {
            keep.push((entry, deliveries));
        }
    }
    Ok((keep, dropped))
}

/// How often each entry has been delivered to the group, from its pending entry (one round trip
/// for the whole batch). An entry no longer pending counts as delivered once.
pub(crate) async fn with_delivery_counts(
    conn: &mut ConnectionManager,
    group: &str,
    entries: Vec<Entry>,
) -> Result<Vec<(Entry, u64)>, BusError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for entry in &entries {
        pipe.cmd("XPENDING")
            .arg(keys::RESULT_STREAM)
            .arg(group)
            .arg(entry.id.0.as_str())
            .arg(entry.id.0.as_str())
            .arg(1);
    }
    // Each reply: [] or [[id, consumer, idle_ms, times_delivered]].
    let replies: Vec<Vec<(String, String, u64, u64)>> = pipe.query_async(conn).await?;
    Ok(entries
        .into_iter()
        .zip(replies)
        .map(|(entry, reply)| {
            let count = reply.first().map_or(1, |(_, _, _, n)| *n);
            (entry, count)
        })
        .collect())
}
