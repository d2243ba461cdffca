//! The database's schema and who may do what to it. Two roles, least privilege:
//!
//! * the **owner** (`follow-api migrate`, `FOLLOW_DATABASE_OWNER_URL`) applies the migrations
//!   and owns every table;
//! * the **service role** (`FOLLOW_DATABASE_SERVICE_ROLE`, default `follow_api`), which the API
//!   runs as (`FOLLOW_DATABASE_URL`), may only read and write the tables' rows: no DDL, no
//!   temporary tables, no `COPY … PROGRAM`, no superuser.
//!
//! [`migrate`] applies the migrations as the owner, creates the service role if missing (its
//! login with the password it is given, else none), and grants it exactly that. The API itself never migrates: at
//! start-up [`check`] refuses a database whose schema is not this build's.

use follow_service::config::{ExposeSecret as _, SecretString};
use sqlx::{AssertSqlSafe, PgPool};

use crate::MIGRATOR;

/// The role the API runs as.
#[derive(Debug, Clone)]
pub struct ServiceRole {
    name: String,
    /// Set (or reset) the role's login password; `None` when the role is made elsewhere.
    password: Option<SecretString>,
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("the service role name {0:?} is not a plain identifier ([a-z_][a-z0-9_]*, at most 63)")]
    RoleName(String),
    #[error("the service role's password must be at least 16 characters")]
    Password,
    #[error(
        "the database schema is at migration {found}, this build needs {needed}: \
         run `follow-api migrate` as the owner first"
    )]
    Behind { found: i64, needed: i64 },
    #[error("migrating failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl ServiceRole {
    pub const DEFAULT_NAME: &str = "follow_api";

    pub fn new(name: &str, password: Option<SecretString>) -> Result<Self, SchemaError> {
        let plain = name.len() <= 63
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !plain {
            return Err(SchemaError::RoleName(name.to_owned()));
        }
        if password
            .as_ref()
            .is_some_and(|p| p.expose_secret().len() < 16)
        {
            return Err(SchemaError::Password);
        }
        Ok(Self {
            name: name.to_owned(),
            password,
        })
    }
}

/// Applies the migrations on `owner` (the owner's connection), then gives `service` its login
/// (when it has a password) and its rights. Idempotent.
pub async fn migrate(owner: &PgPool, service: &ServiceRole) -> Result<(), SchemaError> {
    MIGRATOR.run(owner).await?;
    let role = &service.name;
    let mut tx = owner.begin().await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role)
            .fetch_one(&mut *tx)
            .await?;
    // Without a password a missing role is made without a login (give it one later with
    // `ALTER ROLE … LOGIN PASSWORD`); its rights are granted either way.
    let login = match &service.password {
        // Utility statements take no parameters: the password goes in as a quoted literal
        // (standard strings: only `'` needs doubling).
        Some(password) => format!(
            "LOGIN PASSWORD '{}'",
            password.expose_secret().replace('\'', "''")
        ),
        None if exists => String::new(),
        None => "NOLOGIN".to_owned(),
    };
    if !(exists && login.is_empty()) {
        let verb = if exists { "ALTER" } else { "CREATE" };
        // The role name is a checked identifier ([`ServiceRole::new`]), the password quoted.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "{verb} ROLE {role} {login} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
             NOBYPASSRLS"
        )))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::raw_sql(AssertSqlSafe(format!(
        "GRANT USAGE ON SCHEMA route, image TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA route, image TO {role};
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA route, image TO {role};
         GRANT SELECT ON public._sqlx_migrations TO {role};
         REVOKE CREATE ON SCHEMA public FROM PUBLIC;
         DO $$ BEGIN
           EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
           EXECUTE format('GRANT CONNECT ON DATABASE %I TO {role}', current_database());
         END $$;"
    )))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Whether the database's schema is this build's (the API's start-up check).
pub async fn check(pool: &PgPool) -> Result<(), SchemaError> {
    let needed = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let found: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .or_else(|e| match &e {
                // No migrations table: nothing was ever applied.
                sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => Ok(None),
                _ => Err(e),
            })?;
    match found.unwrap_or(0) {
        found if found >= needed => Ok(()),
        found => Err(SchemaError::Behind { found, needed }),
    }
}
