//! `local` mode: a stack that is already running, by default the one `./dev up` starts.
//!
//! | variable | default (`./dev up`) |
//! |---|---|
//! | `FOLLOW_E2E_API_URL` | `http://127.0.0.1:8080` |
//! | `FOLLOW_E2E_GATEWAY_URL` | `http://127.0.0.1:8081` |
//! | `FOLLOW_E2E_VALKEY_URL` | `VALKEY` of `.follow/run/stack.env` (the operator, with its password) |
//! | `FOLLOW_E2E_DATABASE_URL` | `DATABASE` of `.follow/run/stack.env` |
//! | `FOLLOW_E2E_USER_SIGNING_KEY` | the contents of `.follow/keys/user.key` |

use std::path::Path;

use anyhow::Context;

use crate::{Backend, Platform};

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// `name`, else the `key` of the stack `./dev up` runs (its `stack.env`, holding passwords).
fn var_or_stack(name: &str, key: &str) -> anyhow::Result<String> {
    if let Ok(value) = std::env::var(name) {
        return Ok(value);
    }
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.follow/run/stack.env");
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("{}: set {name} or run ./dev up", file.display()))?;
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
        .with_context(|| format!("{}: no {key}", file.display()))
}

pub(crate) fn platform() -> anyhow::Result<Platform> {
    let user_signing_key = match std::env::var("FOLLOW_E2E_USER_SIGNING_KEY") {
        Ok(key) => key,
        Err(_) => {
            let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.follow/keys/user.key");
            std::fs::read_to_string(&file)
                .with_context(|| {
                    format!(
                        "{}: set FOLLOW_E2E_USER_SIGNING_KEY or run ./dev up",
                        file.display()
                    )
                })?
                .trim()
                .to_owned()
        }
    };
    Ok(Platform {
        api_url: var("FOLLOW_E2E_API_URL", "http://127.0.0.1:8080"),
        gateway_url: var("FOLLOW_E2E_GATEWAY_URL", "http://127.0.0.1:8081"),
        valkey_url: var_or_stack("FOLLOW_E2E_VALKEY_URL", "VALKEY")?,
        partitions: Platform::partitions_from_env()?,
        database_url: var_or_stack("FOLLOW_E2E_DATABASE_URL", "DATABASE")?,
        user_signing_key,
        backend: Backend::Local,
    })
}
