//! Object storage as the API sees it: where an image is to be stored, and presigned GET URLs
//! for previews. The API never reads or writes image bytes.

use std::time::Duration;

use aws_sdk_s3::{
    Client,
    config::{BehaviorVersion, Credentials, Region},
    presigning::PresigningConfig,
};
use uuid::Uuid;

use crate::config::S3Config;

/// The object key the gateway stores an image's processed bytes under; the gateway derives the
/// preview's key from it and reports both in the result.
pub fn storage_key(route_id: Uuid, image_id: Uuid) -> String {
    format!("routes/{route_id}/images/{image_id}")
}

#[derive(Debug, Clone)]
pub struct Presigner {
    client: Client,
    bucket: String,
    ttl: Duration,
}

impl Presigner {
    pub fn new(config: &S3Config) -> Self {
        let s3 = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&config.endpoint)
            .region(Region::new(config.region.clone()))
            .credentials_provider(Credentials::new(
                &config.access_key_id,
                config.secret_access_key.expose(),
                None,
                None,
                "follow-config",
            ))
            .force_path_style(true)
            .build();
        Self {
            client: Client::from_conf(s3),
            bucket: config.bucket.clone(),
            ttl: config.preview_url_ttl,
        }
    }

    /// A URL that GETs `key` for the configured lifetime. Signing is local: no network.
    pub async fn url(&self, key: &str) -> Option<String> {
        let presigning = PresigningConfig::expires_in(self.ttl).ok()?;
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(presigning)
            .await
        {
            Ok(request) => Some(request.uri().to_owned()),
            Err(e) => {
                tracing::error!(error = %e, key, "presigning a preview URL failed");
                None
            }
        }
    }
}
