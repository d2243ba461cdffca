//! The follow image gateway: one-time uploads (`PUT /upload`) made durable in S3, the image
//! pipeline run from the job queue by whichever gateway is free, results handed to the API
//! through Valkey, and `GatewayService` (status, live stages, pipeline counters).
//!
//! | module | owns |
//! |---|---|
//! | [`app`] | start-up with an injectable listener; the workers; graceful shutdown |
//! | [`config`] | the gateway's `FOLLOW_*` settings |
//! | [`upload`] | the upload handler: token, guard, spooled and checked body, original in S3, job, 202 |
//! | [`spool`] | where bodies wait while they arrive |
//! | [`worker`] | processing a job: original → pipeline → outputs + result record → hand-off |
//! | [`sniff`] | magic bytes, header dimensions and a JPEG's end, before decoding |
//! | [`pipeline`] | decode → orient → resize → encode (pure, on the blocking pool) |
//! | [`report`] | an image's stages, written in order |
//! | [`service`] | gRPC `GatewayService` |
//! | [`http`] / [`metrics`] | the HTTP routes, the health probe, `/metrics` |
//! | [`error`] | the error types and their HTTP and gRPC mappings |
#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod report;
pub mod service;
pub mod sniff;
pub mod spool;
pub mod upload;
pub mod worker;
