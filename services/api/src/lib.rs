//! The follow API service: routes and waypoints in PostgreSQL, signed upload targets, the
//! `image:result` consumer, image status and the live watch.
//!
//! Built so far: the database schema ([`MIGRATOR`], from `migrations/`) and the result applier
//! ([`results`]), the consumer handler that turns gateway results into database state. The RPC
//! surface, start-up and the binary's commands come with the rest of the service.
#![forbid(unsafe_code)]

pub mod results;

/// The API database's migrations (`migrations/` at the workspace root), embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");
