//! A rate limit shared by every instance: GCRA (the generic cell rate algorithm) in one Lua
//! script, so one round trip decides and concurrent callers cannot race. Per subject, `per_minute`
//! units on average, with bursts of up to `burst` units; a call costs one or more units (an
//! upload token each, say). The key expires once its subject is idle.
//!
//! (A crate would do this in one process; a limit across instances needs the shared state in
//! Valkey, and the `redis-cell` module that does it there is not part of Valkey.)

use std::time::Duration;

use redis::Script;

use crate::{BusError, Connection, Valkey, keys};

/// KEYS[1]: the subject's key. ARGV: the interval per unit (ms), the burst tolerance (ms), the
/// cost (units). Returns 0 (allowed, and counted) or how long to wait (ms) before it would be.
const GCRA: &str = r"
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now_ms)
if tat < now_ms then tat = now_ms end
local next_tat = tat + interval * cost
local wait = next_tat - tolerance - now_ms
if wait > 0 then return wait end
redis.call('SET', KEYS[1], next_tat, 'PX', next_tat - now_ms + 1)
return 0
";

/// One named limit (`action`), per subject.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    conn: Connection,
    script: Script,
    action: &'static str,
    interval_ms: u64,
    burst: u32,
}

impl RateLimiter {
    /// `action` names the limit in its keys (`ratelimit:{action}:{subject}`).
    pub fn new(
        valkey: &Valkey,
        action: &'static str,
        per_minute: u32,
        burst: u32,
    ) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
            script: Script::new(GCRA),
            action,
            interval_ms: (60_000 / u64::from(per_minute.max(1))).max(1),
            burst: burst.max(1),
        })
    }

    /// The most one call may cost: more is never allowed.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// `Ok(None)` when `subject` may spend `cost` units now (and they are counted), else how
    /// long to wait before it may.
    pub async fn check(&self, subject: &str, cost: u32) -> Result<Option<Duration>, BusError> {
        let wait: u64 = self
            .script
            .key(keys::rate_limit(self.action, subject))
            .arg(self.interval_ms)
            .arg(self.interval_ms * u64::from(self.burst))
            .arg(cost.max(1))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok((wait > 0).then(|| Duration::from_millis(wait)))
    }
}
