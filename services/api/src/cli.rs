//! The commands of the `follow-api` binary (`serve`, `migrate`, `keygen`, `token`, `dead`,
//! `valkey-acl`): their arguments and what each does. Binary only; the library is the service.

use follow_service::config::FromEnv as _;
use std::{
    io::Write as _,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use follow_api::{
    MIGRATOR,
    app::Application,
    config::{Config, parse_signing_key},
    schema::{self, ServiceRole},
};
use follow_bus::{DeadEntry, DeadId, DeadLetters, Valkey, keys};
use follow_service::config::{Env, SecretString, ValkeySettings};
use follow_token::{Claims as _, Kid, SigningKey, UserClaims};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(name = "follow-api", version, about = "The follow API service")]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// As the owner (FOLLOW_DATABASE_OWNER_URL): apply pending migrations and give the service
    /// role (FOLLOW_DATABASE_SERVICE_ROLE, default follow_api) its rights, creating its login
    /// when FOLLOW_DATABASE_SERVICE_PASSWORD is set; or undo the last migration.
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
        /// Lifetime, at most 7 days (604800 s): the API refuses longer-lived user tokens.
        #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..=UserClaims::MAX_LIFETIME.as_secs()))]
        ttl_secs: u64,
        /// `kid=KEY`; defaults to FOLLOW_USER_SIGNING_KEY.
        #[arg(long, env = "FOLLOW_USER_SIGNING_KEY", hide_env_values = true)]
        key: String,
    },
    /// Results that could not be applied (image:result:dead), on FOLLOW_VALKEY_URL.
    Dead {
        /// Print JSON (one object per entry, or one summary object).
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: DeadAction,
    },
    /// Write Valkey's ACL file: the operator and one user per service, each allowed only what
    /// it needs (passwords from FOLLOW_VALKEY_{ADMIN,API,GATEWAY}_PASSWORD, stored hashed).
    ValkeyAcl {
        /// Write here (mode 0644: it holds only hashes) instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DeadAction {
    /// List dead entries, oldest first, with their reason.
    List {
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Start after this entry id (`pN/<stream id>`, as listed).
        #[arg(long)]
        after: Option<DeadId>,
    },
    /// Show one dead entry with every field.
    Show { id: DeadId },
    /// Put entries back on image:result (applying a result twice changes nothing).
    Replay {
        ids: Vec<DeadId>,
        /// Replay every dead entry.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Remove entries from the dead stream.
    Drop {
        #[arg(required = true)]
        ids: Vec<DeadId>,
    },
}

pub(crate) async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve().await,
        Command::Migrate { revert } => migrate(revert).await,
        Command::Keygen { kid, out } => keygen(kid, out),
        Command::Token { sub, ttl_secs, key } => {
            let key = parse_signing_key("FOLLOW_USER_SIGNING_KEY", &key)?;
            let claims = UserClaims::new(sub, SystemTime::now(), Duration::from_secs(ttl_secs));
            writeln!(std::io::stdout(), "{}", key.sign(&claims)?)?;
            Ok(())
        }
        Command::Dead { json, action } => dead(action, json).await,
        Command::ValkeyAcl { out } => valkey_acl(out),
    }
}

fn valkey_acl(out: Option<PathBuf>) -> anyhow::Result<()> {
    use follow_bus::acl::{User, acl_file};
    let mut passwords = Vec::new();
    for user in User::ALL {
        let name = match user {
            User::Admin => "FOLLOW_VALKEY_ADMIN_PASSWORD",
            User::Api => "FOLLOW_VALKEY_API_PASSWORD",
            User::Gateway => "FOLLOW_VALKEY_GATEWAY_PASSWORD",
        };
        let password = std::env::var(name).with_context(|| format!("{name} is required"))?;
        if password.len() < 16 || password.chars().any(|c| c.is_whitespace()) {
            bail!("{name}: at least 16 characters, no whitespace");
        }
        passwords.push((user, password));
    }
    let file = acl_file(|user| {
        passwords
            .iter()
            .find(|(u, _)| *u == user)
            .map(|(_, p)| p.clone())
            .unwrap_or_default()
    });
    match out {
        Some(path) => std::fs::write(&path, file).with_context(|| path.display().to_string()),
        None => Ok(std::io::stdout().write_all(file.as_bytes())?),
    }
}

async fn serve() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    tracing::info!(?config, "starting");
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("binding {}", config.server.listen))?;
    let application = Application::build(config, listener).await?;
    let cancel = follow_service::runtime::shutdown_token();
    application.run(cancel).await?;
    Ok(())
}

async fn migrate(revert: bool) -> anyhow::Result<()> {
    let url = std::env::var("FOLLOW_DATABASE_OWNER_URL")
        .context("FOLLOW_DATABASE_OWNER_URL (the owner's connection) is required")?;
    let pool = sqlx::PgPool::connect(&url)
        .await
        .context("connecting to PostgreSQL")?;
    if revert {
        // Back to the one before the last applied (sqlx undoes everything above the target).
        let applied: Vec<i64> = sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version DESC LIMIT 2",
        )
        .fetch_all(&pool)
        .await
        .context("reading the applied migrations")?;
        let target = applied.get(1).copied().unwrap_or(0);
        MIGRATOR.undo(&pool, target).await?;
        tracing::info!(target, "migration undone");
    } else {
        let name = std::env::var("FOLLOW_DATABASE_SERVICE_ROLE")
            .unwrap_or_else(|_| ServiceRole::DEFAULT_NAME.to_owned());
        let password = std::env::var("FOLLOW_DATABASE_SERVICE_PASSWORD")
            .ok()
            .map(SecretString::from);
        let role = ServiceRole::new(&name, password)?;
        schema::migrate(&pool, &role).await?;
        tracing::info!(
            role = name,
            "migrations applied; the service role has its rights"
        );
    }
    Ok(())
}

async fn dead(action: DeadAction, json: bool) -> anyhow::Result<()> {
    let lookup = |name: &str| std::env::var(name).ok();
    let valkey = ValkeySettings::from_env(&Env::new(&lookup))?;
    let mut dead = DeadLetters::new(&Valkey::new(valkey.config())?, keys::RESULTS)?;
    let mut out = std::io::stdout();
    match action {
        DeadAction::List { count, after } => {
            let entries = dead.list(after.as_ref(), count).await?;
            list(&mut out, &entries, json)
        }
        DeadAction::Show { id } => {
            let Some(entry) = dead.show(&id).await? else {
                bail!("no dead entry {id}");
            };
            show(&mut out, &entry, json)
        }
        DeadAction::Replay { ids, all } => {
            let ids: Vec<DeadId> = if all {
                every_dead(&mut dead).await?
            } else if ids.is_empty() {
                bail!("name the entries to replay, or --all");
            } else {
                ids
            };
            let (mut replayed, mut missing) = (Vec::new(), Vec::new());
            for id in ids {
                match dead.replay(&id).await? {
                    Some(new) => replayed.push(format!("{id} -> {new}")),
                    None => missing.push(id),
                }
            }
            report(&mut out, json, "replayed", &replayed, &missing)
        }
        DeadAction::Drop { ids } => {
            let (mut dropped, mut missing) = (Vec::new(), Vec::new());
            for id in ids {
                if dead.drop_entry(&id).await? {
                    dropped.push(id.to_string());
                } else {
                    missing.push(id);
                }
            }
            report(&mut out, json, "dropped", &dropped, &missing)
        }
    }
}

/// The ids of every dead entry, page by page.
async fn every_dead(dead: &mut DeadLetters) -> anyhow::Result<Vec<DeadId>> {
    let (mut ids, mut after) = (Vec::new(), None);
    loop {
        let page = dead.list(after.as_ref(), 500).await?;
        let Some(last) = page.last().map(|e| e.id.clone()) else {
            return Ok(ids);
        };
        ids.extend(page.into_iter().map(|e| e.id));
        after = Some(last);
    }
}

fn list(out: &mut impl std::io::Write, entries: &[DeadEntry], json: bool) -> anyhow::Result<()> {
    for entry in entries {
        if json {
            writeln!(out, "{}", entry_json(entry, false))?;
        } else {
            let image = field(entry, "image_id");
            writeln!(
                out,
                "{}  image {image}  deliveries {}  failures {}  at {}\n    {}",
                entry.id, entry.deliveries, entry.failures, entry.dead_at, entry.reason
            )?;
        }
    }
    if !json {
        let plural = if entries.len() == 1 { "y" } else { "ies" };
        writeln!(out, "{} dead entr{plural}", entries.len())?;
    }
    Ok(())
}

fn show(out: &mut impl std::io::Write, entry: &DeadEntry, json: bool) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", entry_json(entry, true))?;
        return Ok(());
    }
    writeln!(
        out,
        "id:          {}\nreason:      {}\noriginal id: {}\nconsumer:    {}\ndeliveries:  {}\nfailures:    {}\ndead at:     {}\nfields:",
        entry.id,
        entry.reason,
        entry.original_id,
        entry.consumer,
        entry.deliveries,
        entry.failures,
        entry.dead_at
    )?;
    for (name, value) in &entry.fields {
        writeln!(out, "  {name} = {value}")?;
    }
    Ok(())
}

fn field<'a>(entry: &'a DeadEntry, name: &str) -> &'a str {
    entry
        .fields
        .iter()
        .find(|(n, _)| n == name)
        .map_or("?", |(_, v)| v.as_str())
}

fn entry_json(entry: &DeadEntry, with_fields: bool) -> serde_json::Value {
    let mut value = serde_json::json!({
        "id": entry.id.to_string(),
        "image_id": field(entry, "image_id"),
        "reason": entry.reason,
        "original_id": entry.original_id,
        "consumer": entry.consumer,
        "deliveries": entry.deliveries,
        "failures": entry.failures,
        "dead_at": entry.dead_at,
    });
    if with_fields {
        value["fields"] = entry
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    value
}

fn report(
    out: &mut impl std::io::Write,
    json: bool,
    done: &str,
    ids: &[String],
    missing: &[DeadId],
) -> anyhow::Result<()> {
    let missing: Vec<String> = missing.iter().map(ToString::to_string).collect();
    if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({ done: ids, "missing": missing })
        )?;
    } else {
        for id in ids {
            writeln!(out, "{done} {id}")?;
        }
        for id in &missing {
            writeln!(out, "no dead entry {id}")?;
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} of the entries were not in the dead stream",
            missing.len()
        )
    }
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
