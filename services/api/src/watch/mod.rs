//! The live watch: one `WatchImageStatus` stream's [`session`], fed by the process's
//! [`follow_bus::Hub`].

mod cursor;
pub mod session;
