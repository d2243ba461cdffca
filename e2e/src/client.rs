//! What a client of the platform does, in a few helpers: authenticated requests, grpc-web,
//! uploads, and test photos.

use std::io::Cursor;

use follow_proto::tonic::{Request, metadata::MetadataValue};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb, Rgba};

/// A grpc-web channel, as a browser has.
pub type GrpcWeb = tonic_web::GrpcWebClientService<
    Client<HttpConnector, tonic_web::GrpcWebCall<follow_proto::tonic::body::Body>>,
>;

pub fn grpc_web() -> GrpcWeb {
    grpc_web_client(Client::builder(hyper_util::rt::TokioExecutor::new()).build_http())
}

/// A grpc-web channel over HTTP/2, as a browser has over TLS (to a proxy that keeps HTTP/2 to
/// the API): every call of this channel shares one connection.
pub fn grpc_web_h2() -> GrpcWeb {
    grpc_web_client(
        Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http(),
    )
}

fn grpc_web_client(
    client: Client<HttpConnector, tonic_web::GrpcWebCall<follow_proto::tonic::body::Body>>,
) -> GrpcWeb {
    tower::ServiceBuilder::new()
        .layer(tonic_web::GrpcWebClientLayer::new())
        .service(client)
}

/// `message` with a bearer token.
pub fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

/// A watch of these images from their current state (no resume cursor).
pub fn watch_images(ids: &[&str]) -> follow_proto::api::v1::WatchImageStatusRequest {
    use follow_proto::api::v1::{ImageIds, watch_image_status_request::Target};
    follow_proto::api::v1::WatchImageStatusRequest {
        target: Some(Target::Images(ImageIds {
            image_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
        })),
        resume_cursor: String::new(),
    }
}

/// `PUT` of `body` to an upload URL: the status and the JSON answer.
pub async fn upload(
    url: &str,
    content_type: &str,
    body: Vec<u8>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let response = reqwest::Client::new()
        .put(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or_default()))
}

/// Uploads `body` to `url` and expects it accepted.
pub async fn upload_accepted(url: &str, content_type: &str, body: Vec<u8>) {
    let (status, answer) = upload(url, content_type, body).await.unwrap();
    assert_eq!(status, 202, "{answer}");
}

/// A photo-like JPEG: smooth gradients, so it compresses like one.
pub fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let image = ImageBuffer::from_fn(width, height, |x, y| {
        Rgb([
            (x * 255 / width.max(1)) as u8,
            (y * 255 / height.max(1)) as u8,
            ((x + y) % 256) as u8,
        ])
    });
    encode(DynamicImage::ImageRgb8(image), ImageFormat::Jpeg)
}

/// A PNG with a real alpha channel.
pub fn png_with_alpha(width: u32, height: u32) -> Vec<u8> {
    let image = ImageBuffer::from_fn(width, height, |x, y| {
        Rgba([
            (x % 256) as u8,
            (y % 256) as u8,
            128,
            (x * 255 / width.max(1)) as u8,
        ])
    });
    encode(DynamicImage::ImageRgba8(image), ImageFormat::Png)
}

fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}
