//! The `follow-api` binary's commands: keygen, token, migrate, and refusing bad settings.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use follow_api::config::parse_signing_key;
use follow_testkit::PostgresServer;
use follow_token::{UserClaims, Verifier, VerifyingKeys};

fn follow_api(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_follow-api"));
    command
        .args(args)
        .env_clear()
        .env("FOLLOW_LOG_FORMAT", "text");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn keygen_then_token_gives_a_user_token_the_api_accepts() {
    let keys = stdout(&follow_api(&["keygen", "--kid", "dev-1"], &[]));
    let lines: Vec<&str> = keys.lines().filter(|l| !l.starts_with('#')).collect();
    let [private, public] = lines[..] else {
        panic!("{keys}")
    };
    let token = stdout(&follow_api(
        &["token", "--sub", "dev"],
        &[("FOLLOW_USER_SIGNING_KEY", private)],
    ));
    let verifier = Verifier::<UserClaims>::new(VerifyingKeys::parse_list(public).unwrap());
    assert_eq!(verifier.verify(token.trim()).unwrap().sub, "dev");
    parse_signing_key("key", private).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("keys");
    stdout(&follow_api(
        &["keygen", "--kid", "k9", "--out", out.to_str().unwrap()],
        &[],
    ));
    let pem = std::fs::read_to_string(out.join("k9.key")).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(out.join("k9.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // Never overwrites a key.
    assert!(
        !follow_api(
            &["keygen", "--kid", "k9", "--out", out.to_str().unwrap()],
            &[]
        )
        .status
        .success()
    );
}

#[test]
fn bad_settings_stop_the_service_naming_the_variable_without_leaking_secrets() {
    let output = follow_api(
        &["token", "--sub", "dev"],
        &[("FOLLOW_USER_SIGNING_KEY", "k1=c2VjcmV0LW5vdC1hLWtleQ")],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("FOLLOW_USER_SIGNING_KEY"), "{stderr}");
    assert!(!stderr.contains("c2VjcmV0LW5vdC1hLWtleQ"), "{stderr}");

    let output = follow_api(
        &["serve"],
        &[("FOLLOW_DATABASE_URL", "postgres://u:hunter2@127.0.0.1:1/x")],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("FOLLOW_"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[tokio::test]
async fn migrate_applies_and_reverts() {
    let pg = PostgresServer::start().await.unwrap();
    let url = pg.url();
    let env = [("FOLLOW_DATABASE_OWNER_URL", url.as_str())];
    stdout(&follow_api(&["migrate"], &env));
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let tables = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema IN ('route', 'image')",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(tables(pool.clone()).await, 4);
    stdout(&follow_api(&["migrate"], &env)); // idempotent
    // One migration at a time, back to nothing.
    while tables(pool.clone()).await > 0 {
        stdout(&follow_api(&["migrate", "--revert"], &env));
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "every migration reverted");
}

/// The API runs as a role that can read and write its tables' rows and nothing else: no DDL,
/// no temporary tables, no `COPY … PROGRAM`, not a superuser. `follow-api migrate` makes it so.
#[tokio::test]
async fn the_service_role_can_only_read_and_write_rows() {
    let pg = PostgresServer::start().await.unwrap();
    let (owner, password) = (pg.url(), pg.service_password());
    let env = [
        ("FOLLOW_DATABASE_OWNER_URL", owner.as_str()),
        ("FOLLOW_DATABASE_SERVICE_PASSWORD", password.as_str()),
    ];
    stdout(&follow_api(&["migrate"], &env));
    stdout(&follow_api(&["migrate"], &env)); // idempotent, role included
    let service = sqlx::PgPool::connect(&pg.service_url()).await.unwrap();
    let superuser: bool =
        sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&service)
            .await
            .unwrap();
    assert!(!superuser);
    // Its job: rows.
    sqlx::query(
        "INSERT INTO route.routes (id, owner, name, request_id, status) \
         VALUES (gen_random_uuid(), 'alice', 'r', 'q', 'PENDING')",
    )
    .execute(&service)
    .await
    .unwrap();
    let routes: i64 = sqlx::query_scalar("SELECT count(*) FROM route.routes")
        .fetch_one(&service)
        .await
        .unwrap();
    assert_eq!(routes, 1);
    // Nothing else.
    for forbidden in [
        "CREATE TABLE route.mine (i int)",
        "CREATE TABLE public.mine (i int)",
        "CREATE TABLE mine (i int)",
        "CREATE TEMP TABLE mine (i int)",
        "CREATE SCHEMA mine",
        "ALTER TABLE image.images ADD COLUMN mine int",
        "DROP TABLE route.waypoints",
        "TRUNCATE route.routes",
        "COPY (SELECT 1) TO PROGRAM 'true'",
        "COPY route.routes FROM PROGRAM 'true'",
        "CREATE ROLE mine",
        "CREATE DATABASE mine",
        "DELETE FROM _sqlx_migrations",
        "ALTER ROLE follow_api SUPERUSER",
    ] {
        let refused = sqlx::raw_sql(forbidden)
            .execute(&service)
            .await
            .unwrap_err();
        let code = refused.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("42501"), "{forbidden}: {refused}");
    }
}
