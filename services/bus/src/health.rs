use redis::aio::ConnectionManager;

use crate::{BusError, Valkey, keys};

/// Whether Valkey answers, and whether the consumer group exists.
#[derive(Clone, Debug)]
pub struct HealthChecker {
    conn: ConnectionManager,
    group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `PING` answered.
    pub valkey: bool,
    /// Whether the group exists on `image:result`; `None` when not checked (or Valkey is down).
    pub group: Option<bool>,
}

impl HealthChecker {
    /// `group`: the consumer group to look for (the API's), or `None` (the gateway).
    pub fn new(valkey: &Valkey, group: Option<&str>) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
            group: group.map(str::to_owned),
        })
    }

    pub async fn check(&mut self) -> Health {
        let ping: Result<String, _> = redis::cmd("PING").query_async(&mut self.conn).await;
        if let Err(e) = ping {
            tracing::debug!(error = %e, "valkey health: PING failed");
            return Health {
                valkey: false,
                group: None,
            };
        }
        let group = match self.group.clone() {
            None => None,
            Some(name) => Some(self.group_exists(&name).await.unwrap_or(false)),
        };
        Health {
            valkey: true,
            group,
        }
    }

    async fn group_exists(&mut self, name: &str) -> Result<bool, BusError> {
        Ok(self.group_info_of(name).await?.is_some())
    }

    /// The checked group's backlog, `None` when it does not exist (or no group is checked).
    pub async fn group_info(&mut self) -> Result<Option<GroupInfo>, BusError> {
        match self.group.clone() {
            Some(name) => self.group_info_of(&name).await,
            None => Ok(None),
        }
    }

    async fn group_info_of(&mut self, name: &str) -> Result<Option<GroupInfo>, BusError> {
        let groups: Result<redis::streams::StreamInfoGroupsReply, _> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(keys::RESULT_STREAM)
            .query_async(&mut self.conn)
            .await;
        match groups {
            Ok(g) => Ok(g.groups.iter().find(|g| g.name == name).map(|g| GroupInfo {
                pending: g.pending as u64,
                lag: g.lag.map(|l| l as u64),
            })),
            Err(e) if e.code() == Some("ERR") => Ok(None), // no such stream yet
            Err(e) => Err(e.into()),
        }
    }
}

/// A consumer group's backlog (`XINFO GROUPS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupInfo {
    /// Delivered, not acknowledged.
    pub pending: u64,
    /// Not delivered yet; `None` when Valkey cannot tell (after deletions it may not).
    pub lag: Option<u64>,
}
