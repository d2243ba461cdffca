//! The follow API service: routes and waypoints in PostgreSQL, signed upload targets, the
//! `image:result` consumer, image status and the live watch.
//!
//! | module | owns |
//! |---|---|
//! | [`app`] | start-up from [`config::Config`] with an injectable listener; graceful shutdown |
//! | [`config`] | the `FOLLOW_*` settings, validated once |
//! | [`routes`] / [`images`] | the gRPC services `RouteService` and `ImageService` |
//! | [`watch`] | live watch: the per-instance pub/sub hub and one stream's session |
//! | [`results`] | applying `image:result` entries to PostgreSQL (the consumer's handler) |
//! | [`store`] | the RPCs' SQL |
//! | [`workers`] | supervised background tasks: consumer, trimmer, expiry, health |
//! | [`http`] / [`metrics`] | `/health`, `/metrics` |
//! | [`error`] | the one error type and its mapping to `tonic::Status` |
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod breaker;
pub mod config;
pub mod error;
pub mod http;
pub mod images;
pub mod metrics;
pub mod results;
pub mod routes;
pub mod state;
pub mod storage;
pub mod store;
pub mod watch;
pub mod workers;

/// The API database's migrations (`migrations/` at the workspace root), embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");
