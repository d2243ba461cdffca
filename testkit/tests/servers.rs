//! The harness's servers work with the real clients the services use, restart, and go away.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use aws_sdk_s3::{
    Client,
    config::{BehaviorVersion, Credentials, Region},
    primitives::ByteStream,
};
use follow_testkit::{GarageServer, PostgresServer, ValkeyServer};

#[tokio::test]
async fn postgres_serves_sql_keeps_data_across_a_restart_and_dies_with_its_handle() {
    let mut pg = PostgresServer::start().await.unwrap();
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    sqlx::query("CREATE TABLE t (v TEXT)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES ('kept')")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    pg.restart().await.unwrap();
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let v: String = sqlx::query_scalar("SELECT v FROM t")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(v, "kept");
    pool.close().await;

    let url = pg.url();
    drop(pg);
    // One attempt (a pool would retry until its acquire timeout).
    use sqlx::Connection as _;
    assert!(
        sqlx::PgConnection::connect(&url).await.is_err(),
        "server gone with its handle"
    );
}

#[tokio::test]
async fn two_postgres_servers_are_independent() {
    let (a, b) = tokio::join!(PostgresServer::start(), PostgresServer::start());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.port(), b.port());
    let pa = sqlx::PgPool::connect(&a.url()).await.unwrap();
    let pb = sqlx::PgPool::connect(&b.url()).await.unwrap();
    sqlx::query("CREATE TABLE only_in_a (x INT)")
        .execute(&pa)
        .await
        .unwrap();
    assert!(
        sqlx::query("SELECT * FROM only_in_a")
            .execute(&pb)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn garage_stores_and_serves_objects_over_s3() {
    let garage = GarageServer::start().await.unwrap();
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(garage.region().to_owned()))
        .endpoint_url(garage.endpoint())
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            garage.access_key(),
            garage.secret_key(),
            None,
            None,
            "testkit",
        ))
        .build();
    let s3 = Client::from_conf(config);
    s3.put_object()
        .bucket(garage.bucket())
        .key("routes/r/i.jpg")
        .content_type("image/jpeg")
        .body(ByteStream::from_static(b"\xff\xd8\xff not really a jpeg"))
        .send()
        .await
        .unwrap();
    let got = s3
        .get_object()
        .bucket(garage.bucket())
        .key("routes/r/i.jpg")
        .send()
        .await
        .unwrap();
    assert_eq!(got.content_type(), Some("image/jpeg"));
    let body = got.body.collect().await.unwrap().into_bytes();
    assert_eq!(&body[..], b"\xff\xd8\xff not really a jpeg");
}

#[tokio::test]
async fn valkey_restarts_empty_on_the_same_port() {
    let mut valkey = ValkeyServer::start().await.unwrap();
    let port = valkey.port();
    let mut conn = valkey.connection().await;
    redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    valkey.restart().await.unwrap();
    assert_eq!(valkey.port(), port);
    let mut conn = valkey.connection().await;
    let v: Option<String> = redis::cmd("GET")
        .arg("k")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, None);
}
