//! `follow-api`: the API service binary.
//!
//! * `follow-api` / `follow-api serve` — run the service (settings: `FOLLOW_*`, in
//!   `docs/operations.md`);
//! * `follow-api migrate [--revert]` — as the database's owner (`FOLLOW_DATABASE_OWNER_URL`),
//!   apply the migrations and give the service role its rights (or undo the last migration);
//! * `follow-api keygen --kid K [--out DIR]` — a new Ed25519 key pair;
//! * `follow-api token --sub NAME` — a user token signed with `FOLLOW_USER_SIGNING_KEY`, for
//!   development and tests;
//! * `follow-api dead list | show ID | replay ID… | replay --all | drop ID…` — the results that
//!   could not be applied (`image:result:dead`), for operators (`--json` for machines);
//! * `follow-api valkey-acl [--out FILE]` — Valkey's ACL file (`--aclfile`): the operator
//!   (`default`) and one user per service, passwords from `FOLLOW_VALKEY_ADMIN_PASSWORD`,
//!   `FOLLOW_VALKEY_API_PASSWORD` and `FOLLOW_VALKEY_GATEWAY_PASSWORD` (stored hashed).
//!
//! The commands live in `cli`; this file only starts the runtime.
#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // Reads FAILPOINTS when built with the `failpoints` feature; nothing otherwise.
    let _failpoints = fail::FailScenario::setup();
    follow_service::runtime::main("follow-api", || cli::run(cli))
}
