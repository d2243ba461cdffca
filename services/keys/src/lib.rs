//! The ground floor of the bus: every Valkey key and channel name ([`keys`]) and the rules of
//! who may touch which ([`acl`]). A crate of its own, with no dependency on the rest, so that
//! the test kit starts Valkey with the platform's users without depending on the bus itself.
#![forbid(unsafe_code)]

pub mod acl;
pub mod keys;
