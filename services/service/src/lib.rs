//! The shell both follow services share, written once: each service's `main.rs` and `app.rs`
//! only wire their own parts into it.
//!
//! | module | owns |
//! |---|---|
//! | [`app`] | the skeleton both services run in: workers, health, serving, shutdown |
//! | [`config`] | reading `FOLLOW_*` settings, secrets, the shared server and S3 settings |
//! | [`s3`] | the bucket: the S3 client with the SDK's timeouts and bounded retries, typed errors |
//! | [`objects`] | the S3 object keys of an image |
//! | [`logging`] / [`runtime`] | logs, the runtime, the exit code, the shutdown token (signals) |
//! | [`serve`] | gRPC + grpc-web + reflection + CORS + keepalive + shutdown grace on one port |
//! | [`workers`] | named, supervised background tasks (one that keeps failing is reported down) |
//! | [`failpoint`] | failpoints for the crash tests |
//! | [`health`] | `/health`, `/metrics` and `grpc.health.v1`, from one probe |
//! | [`stream`] | server-streaming responses pulled from a source (no task, no queue) |
//! | [`metrics`] | serving a Prometheus registry; the metrics of a work queue and of the process |
//! | [`heap`] | the global allocator, counting the heap in use |
//! | [`auth`] | the bearer-token parser |
//! | [`limits`] | per-subject concurrency caps |
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod config;
mod failpoint;
pub mod health;
pub mod heap;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod objects;
pub mod runtime;
pub mod s3;
pub mod serve;
pub mod stream;
pub mod workers;

pub use failpoint::failpoint;
