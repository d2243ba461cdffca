//! Stream entries as they come off the wire, parsed by hand from raw replies.
//!
//! The typed replies of the `redis` crate put field names in a `HashMap<String, _>`: one entry
//! with a non-UTF-8 field name would make the whole reply unparsable and wedge the consumer on
//! it forever. Here every entry parses, and a bad one becomes a poison entry on its own.

use std::fmt;

use redis::Value;

use crate::BusError;

/// A stream entry id (`1732356000000-0`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId(pub String);

impl EntryId {
    /// The smallest id greater than this one: `XTRIM MINID` of it drops this entry too.
    pub(crate) fn successor(&self) -> Option<EntryId> {
        let (ms, seq) = self.0.split_once('-')?;
        let (ms, seq): (u64, u64) = (ms.parse().ok()?, seq.parse().ok()?);
        Some(match seq.checked_add(1) {
            Some(seq) => EntryId(format!("{ms}-{seq}")),
            None => EntryId(format!("{}-0", ms.checked_add(1)?)),
        })
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One entry: its id and its fields; `None` when the entry was deleted while still pending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: EntryId,
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// The entries of the one stream in an `XREADGROUP` reply (nil when nothing came).
pub(crate) fn parse_read_reply(reply: Value) -> Result<Vec<Entry>, BusError> {
    match reply {
        Value::Nil => Ok(Vec::new()),
        // RESP2: [[stream, entries]]; RESP3: {stream: entries}.
        Value::Array(streams) => match streams.into_iter().next() {
            None => Ok(Vec::new()),
            Some(Value::Array(mut pair)) if pair.len() == 2 => parse_entries(pair.swap_remove(1)),
            Some(other) => Err(BusError::reply(format!("XREADGROUP stream: {other:?}"))),
        },
        Value::Map(streams) => match streams.into_iter().next() {
            None => Ok(Vec::new()),
            Some((_, entries)) => parse_entries(entries),
        },
        other => Err(BusError::reply(format!("XREADGROUP: {other:?}"))),
    }
}

/// An array of `[id, [field, value, ...]]` (the value part nil for deleted entries).
pub(crate) fn parse_entries(value: Value) -> Result<Vec<Entry>, BusError> {
    let Value::Array(items) = value else {
        return Err(BusError::reply(format!("entries: {value:?}")));
    };
    items.into_iter().map(parse_entry).collect()
}

fn parse_entry(value: Value) -> Result<Entry, BusError> {
    let Value::Array(mut parts) = value else {
        return Err(BusError::reply(format!("entry: {value:?}")));
    };
    if parts.len() != 2 {
        return Err(BusError::reply("entry is not [id, fields]"));
    }
    let fields = parts.pop().unwrap_or(Value::Nil);
    let id = EntryId(string(parts.pop().unwrap_or(Value::Nil))?);
    let fields = match fields {
        Value::Nil => None,
        Value::Array(flat) => {
            let mut pairs = Vec::with_capacity(flat.len() / 2);
            let mut it = flat.into_iter();
            while let (Some(name), Some(value)) = (it.next(), it.next()) {
                pairs.push((bytes(name)?, bytes(value)?));
            }
            Some(pairs)
        }
        Value::Map(map) => Some(
            map.into_iter()
                .map(|(n, v)| Ok((bytes(n)?, bytes(v)?)))
                .collect::<Result<_, BusError>>()?,
        ),
        other => return Err(BusError::reply(format!("entry fields: {other:?}"))),
    };
    Ok(Entry { id, fields })
}

pub(crate) fn bytes(value: Value) -> Result<Vec<u8>, BusError> {
    match value {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        other => Err(BusError::reply(format!("expected a string, got {other:?}"))),
    }
}

pub(crate) fn string(value: Value) -> Result<String, BusError> {
    String::from_utf8(bytes(value)?).map_err(|_| BusError::reply("string is not UTF-8"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn successor_orders_right_after() {
        assert_eq!(
            EntryId("5-0".into()).successor(),
            Some(EntryId("5-1".into()))
        );
        assert_eq!(
            EntryId(format!("5-{}", u64::MAX)).successor(),
            Some(EntryId("6-0".into()))
        );
        assert_eq!(EntryId("garbage".into()).successor(), None);
    }

    #[test]
    fn deleted_and_binary_entries_parse() {
        let reply = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"image:result".to_vec()),
            Value::Array(vec![
                Value::Array(vec![Value::BulkString(b"1-0".to_vec()), Value::Nil]),
                Value::Array(vec![
                    Value::BulkString(b"2-0".to_vec()),
                    Value::Array(vec![
                        Value::BulkString(vec![0xff]),
                        Value::BulkString(vec![0xfe]),
                    ]),
                ]),
            ]),
        ])]);
        let entries = parse_read_reply(reply).unwrap();
        assert_eq!(entries[0].fields, None);
        assert_eq!(entries[1].fields, Some(vec![(vec![0xff], vec![0xfe])]));
    }
}
