//! `follow-image-gateway`: one-time uploads, the staged image pipeline, storage in S3, progress
//! and results on Valkey.
//!
//! Not built yet: this binary only reports that. The foundation it stands on is in
//! `follow-proto`, `follow-bus` and `follow-token`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "follow-image-gateway {}: the service is not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
