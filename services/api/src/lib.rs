//! The follow API service: routes and waypoints in PostgreSQL, signed upload targets, the
//! `image:result` consumer, image status and the live watch.
//!
//! | module | owns |
//! |---|---|
//! | [`app`] | start-up from [`config::Config`] with an injectable listener; the workers; graceful shutdown |
//! | [`config`] | the `FOLLOW_*` settings, validated once |
//! | [`routes`] / [`images`] | the gRPC services `RouteService` and `ImageService` |
//! | [`watch`] | live watch: the per-instance pub/sub hub and one stream's session |
//! | [`results`] | applying results to PostgreSQL: the one state machine (the consumer's handler) |
//! | [`reconciler`] | pending images whose upload may have been accepted: records, originals, expiry |
//! | [`store`] | the RPCs' and the reconciler's SQL, typed rows and statuses |
//! | [`schema`] | migrations as the owner, the service role's rights, the start-up schema check |
//! | [`views`] | database records as API messages |
//! | [`state`] | what every RPC shares |
//! | [`auth`] / [`breaker`] | the caller's identity; the circuit breaker in front of Valkey |
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
pub mod reconciler;
pub mod results;
pub mod routes;
pub mod schema;
pub mod state;
pub mod store;
pub mod views;
pub mod watch;

/// The API database's migrations (`migrations/` at the workspace root), embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");
