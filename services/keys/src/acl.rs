//! Who may do what on Valkey: one ACL user per service, each allowed only the keys, channels and
//! commands its code uses, plus the `default` user for operators. [`acl_file`] writes them in
//! Valkey's ACL file format (`valkey-server --aclfile`), with password hashes, never passwords;
//! `./dev up`, the test kit and `compose.yaml` (through `follow-api valkey-acl`) all start
//! Valkey with it, so every test runs the services under the same rules as production.
//!
//! A service connects as its user with `redis://USER:PASSWORD@HOST:PORT` in `FOLLOW_VALKEY_URL`.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::keys;

/// A Valkey user of the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum User {
    /// `default`: operators and tests; every key and command.
    Admin,
    /// `follow-api`.
    Api,
    /// `follow-image-gateway`.
    Gateway,
}

/// Commands both services run: connection set-up, transactions (`MULTI`), scripts (whose own
/// calls are checked against the same rules), pub/sub and the consumer-group machinery.
const COMMON: &[&str] = &[
    "+@connection",
    "-@admin",
    "-@dangerous",
    "+multi",
    "+exec",
    "+discard",
    "+eval",
    "+evalsha",
    "+script|load",
    "+script|exists",
    "+get",
    "+set",
    "+del",
    "+expire",
    "+hget",
    "+hset",
    "+hgetall",
    "+hmget",
    "+hincrby",
    "+hdel",
    "+publish",
    "+spublish",
    "+subscribe",
    "+ssubscribe",
    "+sunsubscribe",
    "+unsubscribe",
    "+psubscribe",
    "+punsubscribe",
    "+xadd",
    "+xreadgroup",
    "+xack",
    "+xclaim",
    "+xautoclaim",
    "+xpending",
    "+xrange",
    "+xlen",
    "+xtrim",
    "+xgroup|create",
    "+xinfo|groups",
    // A cluster client learns the topology, and follows slots that move.
    "+cluster|slots",
    "+asking",
    "+readonly",
];

impl User {
    pub const ALL: [User; 3] = [User::Admin, User::Api, User::Gateway];

    /// The user name in Valkey (and in `FOLLOW_VALKEY_URL`).
    pub fn name(self) -> &'static str {
        match self {
            User::Admin => "default",
            User::Api => "follow-api",
            User::Gateway => "follow-image-gateway",
        }
    }

    /// The user's rules, after `reset`: keys (`~` read and write), channels (`&`) and
    /// commands, then a selector (`(…)`, its own keys and commands) for the one thing it may do
    /// to the other service's streams: `XADD`. The root rules never name those streams, so no
    /// other command (`DEL`, `XTRIM`, `XACK`, `XCLAIM`, `XREADGROUP`, …) reaches them.
    pub fn rules(self) -> Vec<String> {
        // Scripts name a progress channel as a key too (so that it counts for its slot).
        let shared = [
            format!("~{}", keys::PARTITIONS),
            format!("~{}", keys::UPLOAD_GUARD_PATTERN),
            format!("~{}", keys::STATUS_PATTERN),
            format!("~{}", keys::PROGRESS_PATTERN),
            format!("&{}", keys::PROGRESS_PATTERN),
        ];
        let (mut rules, adds_to): (Vec<String>, keys::Queue) = match self {
            User::Admin => return ["~*", "&*", "+@all"].map(String::from).to_vec(),
            // Consumes results and dead-letters them, counts upload-token rates (`TIME` in
            // the rate script), replays dead entries; queues jobs again and keeps the epoch
            // markers (the reconciler).
            User::Api => (
                vec![
                    format!("~{}", keys::RESULTS.pattern()),
                    format!("~{}", keys::rate_limit("*", "*")),
                    format!("~{}", keys::EPOCH_PATTERN),
                ],
                keys::JOBS,
            ),
            // Consumes jobs and dead-letters them; publishes results.
            // Consumes jobs and dead-letters them; publishes results; keeps resumable uploads.
            User::Gateway => (
                vec![
                    format!("~{}", keys::JOBS.pattern()),
                    format!("~{}", keys::RESUMABLE_PATTERN),
                ],
                keys::RESULTS,
            ),
        };
        rules.extend(shared);
        rules.push("-@all".into());
        rules.extend(COMMON.iter().map(|c| (*c).to_owned()));
        match self {
            User::Api => rules.extend(["+time", "+xdel"].map(String::from)),
            // Resumable uploads: their expiries and each user's open ones.
            User::Gateway => rules.extend(
                [
                    "+pexpire",
                    "+pexpireat",
                    "+exists",
                    "+zadd",
                    "+zrem",
                    "+zrange",
                    "+zremrangebyscore",
                    "+zscore",
                    "+zcard",
                ]
                .map(String::from),
            ),
            User::Admin => {}
        }
        rules.push(format!("(%W~{} -@all +xadd)", adds_to.streams_pattern()));
        rules
    }
}

/// An ACL file giving each user its rules and the password `password(user)` (stored as its
/// SHA-256, as Valkey wants). Passwords are any text without whitespace.
pub fn acl_file(password: impl Fn(User) -> String) -> String {
    let mut file = String::new();
    for user in User::ALL {
        let hash = Sha256::digest(password(user).as_bytes());
        let _ = writeln!(
            file,
            "user {} reset on #{} {}",
            user.name(),
            hex::encode(hash),
            user.rules().join(" ")
        );
    }
    file
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_has_one_line_with_a_hash_and_no_password() {
        let file = acl_file(|user| format!("secret-{}", user.name()));
        assert_eq!(file.lines().count(), 3);
        assert!(!file.contains("secret-"));
        for user in User::ALL {
            let line = file
                .lines()
                .find(|l| l.starts_with(&format!("user {} ", user.name())))
                .unwrap_or_default();
            assert!(line.contains(" on #"), "{line}");
        }
    }

    #[test]
    fn the_gateway_may_only_add_results_and_the_api_only_add_jobs() {
        let gateway = User::Gateway.rules();
        let root_names = |rules: &[String], key: &str| {
            rules
                .iter()
                .any(|r| r.trim_start_matches('%').trim_start_matches('W') == format!("~{key}"))
        };
        assert!(gateway.contains(&"(%W~image:result:{p* -@all +xadd)".to_owned()));
        assert!(!root_names(&gateway, "image:result:*"));
        assert!(!gateway.iter().any(|r| r.starts_with("~ratelimit")));
        let api = User::Api.rules();
        assert!(api.contains(&"(%W~image:jobs:{p* -@all +xadd)".to_owned()));
        assert!(!root_names(&api, "image:jobs:*"));
    }
}
