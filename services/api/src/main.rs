//! `follow-api`: the API service — routes and waypoints in PostgreSQL, signed upload targets,
//! the `image:result` consumer, image status and the live watch.
//!
//! Not built yet: this binary only reports that. The foundation it stands on is in
//! `follow-proto`, `follow-bus` and `follow-token`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "follow-api {}: the service is not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
