//! Storing an original against a real S3 server (Garage): the server checks the body against
//! the SHA-256 the gateway computed while receiving it, so a body that changed on the way (or
//! in the spool file) is refused rather than stored.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use follow_service::{
    config::{S3Config, SecretString},
    s3::Bucket,
};
use follow_testkit::GarageServer;
use sha2::{Digest as _, Sha256};

#[tokio::test]
async fn an_original_is_stored_only_if_it_matches_its_sha256() {
    let garage = GarageServer::start().await.unwrap();
    let bucket = Bucket::new(&S3Config {
        endpoint: garage.endpoint(),
        public_endpoint: garage.endpoint(),
        region: garage.region().to_owned(),
        bucket: garage.bucket().to_owned(),
        access_key_id: garage.access_key().to_owned(),
        secret_access_key: SecretString::from(garage.secret_key().to_owned()),
        connect_timeout: Duration::from_secs(2),
        attempt_timeout: Duration::from_secs(10),
        operation_timeout: Duration::from_secs(30),
        max_attempts: 1,
    });
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &body).unwrap();
    let right: [u8; 32] = Sha256::digest(&body).into();
    let mut wrong = right;
    wrong[0] ^= 1;

    let refused = bucket
        .put_new_file("a/original", file.path(), "image/jpeg", &wrong)
        .await;
    assert!(
        refused.is_err(),
        "a body not matching its checksum is refused"
    );
    assert!(
        !bucket.exists("a/original").await.unwrap(),
        "and not stored"
    );

    bucket
        .put_new_file("a/original", file.path(), "image/jpeg", &right)
        .await
        .unwrap();
    assert_eq!(
        bucket.get("a/original", 10_000_000).await.unwrap(),
        body,
        "stored as sent"
    );
}
