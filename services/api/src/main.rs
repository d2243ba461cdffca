//! `follow-api`: the API service binary.
//!
//! * `follow-api` / `follow-api serve` — run the service (settings: `FOLLOW_*`, see
//!   `follow_api::config`);
//! * `follow-api migrate [--revert]` — apply (or undo the last) database migration;
//! * `follow-api keygen --kid K [--out DIR]` — a new Ed25519 key pair;
//! * `follow-api token --sub NAME` — a user token signed with `FOLLOW_USER_SIGNING_KEY`, for
//!   development and tests.
#![forbid(unsafe_code)]

use std::{
    io::Write as _,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use follow_api::{
    MIGRATOR,
    app::Application,
    config::{Config, parse_signing_key},
};
use follow_token::{Kid, SigningKey, UserClaims};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "follow-api", version, about = "The follow API service")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Apply pending migrations to FOLLOW_DATABASE_URL, or undo the last one.
    Migrate {
        #[arg(long)]
        revert: bool,
    },
    /// Generate an Ed25519 key pair, printed as `kid=KEY` lines (or written to --out).
    Keygen {
        #[arg(long, default_value = "k1")]
        kid: Kid,
        /// Write `<kid>.key` (PKCS#8 PEM, mode 0600) and `<kid>.pub` (SPKI PEM) here instead.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Mint a user token for development and tests.
    Token {
        #[arg(long)]
        sub: String,
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
        /// `kid=KEY`; defaults to FOLLOW_USER_SIGNING_KEY.
        #[arg(long, env = "FOLLOW_USER_SIGNING_KEY", hide_env_values = true)]
        key: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Reads FAILPOINTS when built with the `failpoints` feature; nothing otherwise.
    let _failpoints = fail::FailScenario::setup();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("follow-api: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "follow-api failed");
            eprintln!("follow-api: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve().await,
        Command::Migrate { revert } => {
            init_logging();
            let url =
                std::env::var("FOLLOW_DATABASE_URL").context("FOLLOW_DATABASE_URL is required")?;
            let pool = sqlx::PgPool::connect(&url)
                .await
                .context("connecting to PostgreSQL")?;
            if revert {
                let last = MIGRATOR
                    .iter()
                    .filter(|m| m.migration_type.is_up_migration())
                    .map(|m| m.version)
                    .max();
                let target = MIGRATOR
                    .iter()
                    .map(|m| m.version)
                    .filter(|v| Some(*v) < last)
                    .max()
                    .unwrap_or(0);
                MIGRATOR.undo(&pool, target).await?;
                tracing::info!(target, "migration undone");
            } else {
                MIGRATOR.run(&pool).await?;
                tracing::info!("migrations applied");
            }
            Ok(())
        }
        Command::Keygen { kid, out } => keygen(kid, out),
        Command::Token { sub, ttl_secs, key } => {
            let key = parse_signing_key("FOLLOW_USER_SIGNING_KEY", &key)?;
            let claims = UserClaims::new(sub, SystemTime::now(), Duration::from_secs(ttl_secs));
            writeln!(std::io::stdout(), "{}", key.sign(&claims)?)?;
            Ok(())
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    init_logging();
    let config = Config::from_env()?;
    tracing::info!(?config, "starting");
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let application = Application::build(config, listener).await?;
    let cancel = CancellationToken::new();
    let signals = tokio::spawn(shutdown_on_signal(cancel.clone()));
    let result = application.run(cancel).await;
    signals.abort();
    Ok(result?)
}

/// Cancels on SIGINT or SIGTERM.
async fn shutdown_on_signal(cancel: CancellationToken) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutdown requested");
    cancel.cancel();
}

fn keygen(kid: Kid, out: Option<PathBuf>) -> anyhow::Result<()> {
    let key = SigningKey::generate(kid.clone());
    let public = key.verifying_key();
    let mut stdout = std::io::stdout();
    match out {
        None => {
            writeln!(
                stdout,
                "# private: FOLLOW_UPLOAD_SIGNING_KEY / FOLLOW_USER_SIGNING_KEY (keep secret)"
            )?;
            writeln!(stdout, "{kid}={}", key.to_base64())?;
            writeln!(
                stdout,
                "# public: FOLLOW_USER_PUBLIC_KEYS / the gateway's FOLLOW_UPLOAD_PUBLIC_KEYS"
            )?;
            writeln!(stdout, "{kid}={}", public.to_base64())?;
        }
        Some(dir) => {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::create_dir_all(&dir)?;
            let private = dir.join(format!("{kid}.key"));
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&private)
                .with_context(|| format!("creating {}", private.display()))?
                .write_all(key.to_pkcs8_pem().as_bytes())?;
            std::fs::write(dir.join(format!("{kid}.pub")), public.to_public_key_pem())?;
            writeln!(stdout, "wrote {} and {kid}.pub", private.display())?;
        }
    }
    Ok(())
}

/// JSON logs unless `FOLLOW_LOG_FORMAT=text`; the filter from `FOLLOW_LOG` (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FOLLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("FOLLOW_LOG_FORMAT").is_ok_and(|f| f == "text") {
        builder.init();
    } else {
        builder.json().with_current_span(true).init();
    }
}
