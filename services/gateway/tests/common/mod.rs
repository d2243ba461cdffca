//! A running gateway on a free loopback port with its own real Valkey and Garage (S3), fresh
//! keys, token minting, test images and S3 / stream inspection.
#![allow(dead_code, unreachable_pub)]

use follow_service::config::FromEnv as _;
use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use follow_bus::{ImageResult, StreamMessage as _, Valkey, ValkeyConfig, acl::User, keys};
use follow_image_gateway::{app::Application, config::Config};
use follow_service::objects;
use follow_testkit::{GarageServer, ValkeyServer, eventually_async};
use follow_token::{SigningKey, UploadClaims, UploadGrant};
use image::{
    DynamicImage, ImageBuffer, Rgb, Rgba,
    codecs::{jpeg::JpegEncoder, png::PngEncoder, webp::WebPEncoder},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const WITHIN: Duration = Duration::from_secs(30);

pub type Vars = HashMap<&'static str, String>;

/// The operators' token (`FOLLOW_OPS_TOKEN`) of test gateways.
pub const OPS_TOKEN: &str = "ops-token-of-the-tests";

pub struct Gateway {
    pub valkey_server: ValkeyServer,
    pub garage: GarageServer,
    pub valkey: Valkey,
    pub addr: SocketAddr,
    pub key: SigningKey,
    pub s3: aws_sdk_s3::Client,
    /// The route of every image of this gateway's tokens.
    pub route: Uuid,
    cancel: CancellationToken,
    app: Option<JoinHandle<()>>,
}

impl Gateway {
    pub async fn start() -> Self {
        Self::start_with(Vars::new()).await
    }

    pub async fn start_with(overrides: Vars) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("FOLLOW_LOG")
                    .unwrap_or_else(|_| "warn".into()),
            )
            .try_init();
        let (valkey_server, garage) = tokio::join!(ValkeyServer::start(), GarageServer::start());
        let (valkey_server, garage) = (valkey_server.unwrap(), garage.unwrap());
        let key = SigningKey::generate("upload-1".parse().unwrap());
        let mut vars: Vars = HashMap::from([
            ("FOLLOW_VALKEY_URL", valkey_server.url_as(User::Gateway)),
            (
                "FOLLOW_UPLOAD_PUBLIC_KEYS",
                format!("upload-1={}", key.verifying_key().to_base64()),
            ),
            (
                "FOLLOW_SPOOL_DIR",
                std::env::temp_dir()
                    .join("follow-gateway-test-spool")
                    .display()
                    .to_string(),
            ),
            ("FOLLOW_S3_ATTEMPT_TIMEOUT_SECS", "2".into()),
            ("FOLLOW_S3_OPERATION_TIMEOUT_SECS", "4".into()),
            ("FOLLOW_OPS_TOKEN", OPS_TOKEN.into()),
        ]);
        vars.extend(garage.service_env());
        vars.extend(overrides);
        let config = Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let application = Application::build(config, listener).unwrap();
        let addr = application.local_addr();
        let cancel = CancellationToken::new();
        let app = tokio::spawn({
            let cancel = cancel.clone();
            async move { application.run(cancel).await.unwrap() }
        });
        let s3 = garage.client();
        let valkey = Valkey::new(ValkeyConfig::new(valkey_server.url())).unwrap();
        Self {
            valkey_server,
            garage,
            valkey,
            addr,
            key,
            s3,
            route: Uuid::new_v4(),
            cancel,
            app: Some(app),
        }
    }

    pub async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(app) = self.app.take() {
            app.await.unwrap();
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A gRPC channel to the gateway (HTTP/2).
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// An upload token for a new image.
    pub fn token(&self, content_type: &str, max_file_size: u64) -> (Uuid, String) {
        self.token_of(
            "alice",
            content_type,
            max_file_size,
            Duration::from_secs(600),
        )
    }

    /// An upload token of `sub`'s for a new image, valid for `ttl`.
    pub fn token_of(
        &self,
        sub: &str,
        content_type: &str,
        max_file_size: u64,
        ttl: Duration,
    ) -> (Uuid, String) {
        let image_id = Uuid::new_v4();
        let claims = UploadClaims::new(
            UploadGrant {
                sub: sub.into(),
                image_id,
                storage_key: self.storage_key(image_id),
                content_type: content_type.into(),
                max_file_size,
            },
            SystemTime::now(),
            ttl,
        );
        (image_id, self.key.sign(&claims).unwrap())
    }

    pub async fn put(
        &self,
        token: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (u16, serde_json::Value) {
        self.put_body(token, content_type, body.into()).await
    }

    /// [`Gateway::put`] without a declared length (`Transfer-Encoding: chunked`), in pieces of
    /// 64 KiB.
    pub async fn put_chunked(
        &self,
        token: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (u16, serde_json::Value) {
        let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
            body.chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
        let body = reqwest::Body::wrap_stream(futures_util::stream::iter(pieces));
        self.put_body(token, content_type, body).await
    }

    async fn put_body(
        &self,
        token: &str,
        content_type: &str,
        body: reqwest::Body,
    ) -> (u16, serde_json::Value) {
        let response = reqwest::Client::new()
            .put(format!("{}/upload?token={token}", self.url()))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        (status, body)
    }

    /// Whether `key` is in the bucket.
    pub async fn exists(&self, key: &str) -> bool {
        self.s3
            .head_object()
            .bucket(self.garage.bucket())
            .key(key)
            .send()
            .await
            .is_ok()
    }

    /// The storage key of an image of [`Gateway::token`] (every object of it is under it).
    pub fn storage_key(&self, image_id: Uuid) -> String {
        objects::storage_key(self.route, image_id)
    }

    pub async fn object(&self, key: &str) -> (String, Vec<u8>) {
        let object = self
            .s3
            .get_object()
            .bucket(self.garage.bucket())
            .key(key)
            .send()
            .await
            .unwrap();
        let content_type = object.content_type().unwrap_or_default().to_owned();
        (
            content_type,
            object.body.collect().await.unwrap().into_bytes().to_vec(),
        )
    }

    /// Every result on `image:result` for `image_id`, as of now.
    pub async fn results_of(&self, image_id: Uuid) -> Vec<ImageResult> {
        let stream = keys::RESULTS.stream(self.valkey.partitions().of(image_id));
        self.entries_of(&stream, image_id)
            .await
            .iter()
            .map(|fields| ImageResult::from_fields(fields).unwrap())
            .collect()
    }

    /// How many jobs `image:jobs` holds for `image_id`.
    pub async fn jobs_of(&self, image_id: Uuid) -> usize {
        let stream = keys::JOBS.stream(self.valkey.partitions().of(image_id));
        self.entries_of(&stream, image_id).await.len()
    }

    /// How many results `image:result` holds, on every partition.
    pub async fn results_count(&self) -> u64 {
        let mut conn = self.valkey_server.connection().await;
        let mut count = 0;
        for partition in self.valkey.partitions().all() {
            count +=
                redis::AsyncCommands::xlen::<_, u64>(&mut conn, keys::RESULTS.stream(partition))
                    .await
                    .unwrap();
        }
        count
    }

    async fn entries_of(&self, stream: &str, image_id: Uuid) -> Vec<Vec<(String, String)>> {
        let mut conn = self.valkey_server.connection().await;
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        let id = image_id.to_string();
        entries
            .into_iter()
            .map(|(_, fields)| fields)
            .filter(|fields| fields.iter().any(|(k, v)| k == "image_id" && *v == id))
            .collect()
    }

    /// The result the gateway published for `image_id`, waiting for it.
    pub async fn result(&self, image_id: Uuid) -> ImageResult {
        eventually_async(WITHIN, "the result on image:result", || async {
            self.results_of(image_id).await.into_iter().next()
        })
        .await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Mean absolute difference per channel, 0–255, of two images of the same size.
pub fn mean_difference(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let total: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    total as f64 / a.as_raw().len() as f64
}

/// A phone's HEIC: a grid of 512-pixel tiles, 1600 × 900 (`fixtures/heic/make.py`).
pub const HEIC: &[u8] = include_bytes!("../fixtures/heic/grid.heic");
/// A HEIC with alpha, 200 × 100.
pub const HEIC_ALPHA: &[u8] = include_bytes!("../fixtures/heic/alpha.heic");

pub fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let img = ImageBuffer::from_fn(width, height, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, 128])
    });
    let mut out = Vec::new();
    DynamicImage::ImageRgb8(img)
        .write_with_encoder(JpegEncoder::new_with_quality(&mut out, 90))
        .unwrap();
    out
}

pub fn png_with_alpha(width: u32, height: u32) -> Vec<u8> {
    let img = ImageBuffer::from_fn(width, height, |x, _| Rgba([0, 0, 255, (x % 256) as u8]));
    let mut out = Vec::new();
    DynamicImage::ImageRgba8(img)
        .write_with_encoder(PngEncoder::new(&mut out))
        .unwrap();
    out
}

pub fn webp(width: u32, height: u32) -> Vec<u8> {
    let img = ImageBuffer::from_fn(width, height, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, 0])
    });
    let mut out = Vec::new();
    DynamicImage::ImageRgb8(img)
        .write_with_encoder(WebPEncoder::new_lossless(&mut out))
        .unwrap();
    out
}

/// A JPEG whose EXIF says orientation 6 (rotate 90° clockwise to view) and carries GPS.
pub fn jpeg_with_exif_orientation_6(width: u32, height: u32) -> Vec<u8> {
    with_exif_orientation_6(&jpeg(width, height))
}

/// `plain` (a JPEG) with an EXIF block saying orientation 6 and carrying GPS.
pub fn with_exif_orientation_6(plain: &[u8]) -> Vec<u8> {
    // TIFF, little endian: IFD0 with Orientation = 6 and a GPS IFD pointer; GPS IFD with
    // GPSLatitudeRef = "N".
    let mut tiff: Vec<u8> = b"II*\0".to_vec();
    tiff.extend_from_slice(&8u32.to_le_bytes());
    tiff.extend_from_slice(&2u16.to_le_bytes()); // IFD0: 2 entries
    tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&6u16.to_le_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0x8825u16.to_le_bytes()); // GPS IFD pointer
    tiff.extend_from_slice(&4u16.to_le_bytes()); // LONG
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&38u32.to_le_bytes()); // offset of the GPS IFD
    tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    tiff.extend_from_slice(&1u16.to_le_bytes()); // GPS IFD: 1 entry
    tiff.extend_from_slice(&0x0001u16.to_le_bytes()); // GPSLatitudeRef
    tiff.extend_from_slice(&2u16.to_le_bytes()); // ASCII
    tiff.extend_from_slice(&2u32.to_le_bytes());
    tiff.extend_from_slice(b"N\0\0\0");
    tiff.extend_from_slice(&0u32.to_le_bytes());
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = plain[..2].to_vec(); // SOI
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&u16::try_from(app1.len() + 2).unwrap().to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&plain[2..]);
    out
}

/// `message` with `authorization: Bearer {token}`.
pub fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}
