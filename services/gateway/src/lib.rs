//! The follow image gateway: one-time uploads (`PUT /upload`), the staged image pipeline,
//! storage in S3, progress and results on Valkey, and `GatewayService` (status, live stages).
//!
//! | module | owns |
//! |---|---|
//! | [`app`] | start-up with an injectable listener; graceful shutdown that publishes every result |
//! | [`config`] | the `FOLLOW_*` settings |
//! | [`upload`] | the upload handler: token, guard, streamed checks, 202; the background pipeline run |
//! | [`sniff`] | magic bytes and header dimensions, before decoding |
//! | [`pipeline`] | decode → orient → resize → encode (pure, on the blocking pool) |
//! | [`storage`] | S3 writes and health |
//! | [`outbox`] | results in order to `image:result`, kept while Valkey is down |
//! | [`service`] | gRPC `GatewayService` |
//! | [`http`] / [`metrics`] | `/health`, `/metrics` |
//! | [`error`] | the one error type and its HTTP mapping |
#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod outbox;
pub mod pipeline;
pub mod service;
pub mod sniff;
pub mod storage;
pub mod upload;
