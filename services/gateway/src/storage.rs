//! The bucket: processed images and previews are written here with their content type.

use aws_sdk_s3::{
    Client,
    config::{BehaviorVersion, Credentials, Region},
    primitives::ByteStream,
};

use crate::config::S3Config;

#[derive(Debug, Clone)]
pub struct Storage {
    client: Client,
    bucket: String,
}

/// The preview's key, derived from the image's (the token's `storage_key`).
pub fn preview_key(storage_key: &str) -> String {
    format!("{storage_key}.preview")
}

impl Storage {
    pub fn new(config: &S3Config) -> Self {
        let s3 = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&config.endpoint)
            .region(Region::new(config.region.clone()))
            .credentials_provider(Credentials::new(
                &config.access_key_id,
                &config.secret_access_key.0,
                None,
                None,
                "follow-config",
            ))
            .force_path_style(true)
            .build();
        Self {
            client: Client::from_conf(s3),
            bucket: config.bucket.clone(),
        }
    }

    pub async fn put(&self, key: &str, bytes: Vec<u8>, content_type: &str) -> Result<(), String> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| format!("{}", aws_sdk_s3::error::DisplayErrorContext(e)))
    }

    /// Whether the bucket answers (for `/health`).
    pub async fn healthy(&self) -> bool {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
    }
}
