//! Resumable uploads (tus) across gateway instances and their crashes: a 20 MB photo sent in
//! 5 MB chunks to two gateways in turn, one of them killed between chunks, is processed once,
//! with its bytes' SHA-256. Real processes (spawn mode).
#![allow(clippy::unwrap_used)]

use follow_e2e::{
    Platform, Service,
    client::jpeg,
    user::{User, WAIT},
};
use follow_proto::api::v1 as api;
use follow_testkit::eventually_async;
use reqwest::{Client, Method};
use sha2::{Digest as _, Sha256};

const CHUNK: usize = 5_000_000;

/// A photo of `bytes` bytes: a real JPEG, then a trailer after its end (as some cameras write).
fn photo(bytes: usize) -> Vec<u8> {
    let mut body = jpeg(1600, 1200);
    body.resize(bytes, 0x3C);
    body
}

fn tus(client: &Client, method: Method, url: &str) -> reqwest::RequestBuilder {
    client.request(method, url).header("tus-resumable", "1.0.0")
}

#[tokio::test]
async fn a_photo_sent_in_chunks_to_two_gateways_one_killed_between_is_processed_once() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.is_spawned("a gateway killed and restarted between chunks") {
        return;
    }
    let other = platform.add_gateway(&[]).await.unwrap();
    let mut user = User::new(&platform).await;
    let created = user
        .create_route_sized(&platform, &[(0.5, 0.5)], 20_000_000)
        .await;
    let route_id = created.route.as_ref().unwrap().id.clone();
    let target = &created.upload_targets[0];
    let body = photo(20_000_000);
    let client = Client::new();
    let made = tus(&client, Method::POST, &target.upload_url)
        .header("upload-length", body.len().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 201, "{:?}", made.text().await);
    let location = made.headers()["location"].to_str().unwrap().to_owned();
    let gateways = [platform.gateway_url.clone(), other];
    for (n, chunk) in body.chunks(CHUNK).enumerate() {
        if n == 2 {
            // The first gateway dies between chunks (it took chunk 0), and comes back.
            platform.kill(Service::Gateway).await.unwrap();
        }
        if n == 3 {
            platform.start_service(Service::Gateway, &[]).await.unwrap();
        }
        // While the first is dead, the other takes every chunk.
        let gateway = if n == 2 {
            &gateways[1]
        } else {
            &gateways[n % 2]
        };
        let url = format!("{gateway}{location}");
        let offset = n * CHUNK;
        let head = tus(&client, Method::HEAD, &url).send().await.unwrap();
        assert_eq!(head.headers()["upload-offset"], offset.to_string().as_str());
        let sent = tus(&client, Method::PATCH, &url)
            .header("upload-offset", offset.to_string())
            .header("content-type", "application/offset+octet-stream")
            .body(chunk.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(sent.status(), 204, "chunk {n}: {:?}", sent.text().await);
        let at = sent.headers()["upload-offset"].to_str().unwrap().to_owned();
        assert_eq!(at, (offset + chunk.len()).to_string());
    }
    user.wait_route(&platform, &route_id, api::RouteStatus::Ready)
        .await;
    let db = platform.database().await.unwrap();
    let (status, sha256): (String, Option<String>) =
        sqlx::query_as("SELECT status::text, sha256 FROM image.images WHERE id = $1::uuid")
            .bind(&target.image_id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(status, "PROCESSED");
    assert_eq!(sha256, Some(hex::encode(Sha256::digest(&body))));
    let applied = eventually_async(WAIT, "the result applied", || async {
        let name = "follow_api_results_applied_total{outcome=\"processed\"}";
        platform
            .metric(&platform.api_url, name)
            .await
            .ok()
            .filter(|n| *n >= 1.0)
    })
    .await;
    assert_eq!(applied, 1.0, "processed once");
    user.clean_up(&platform).await;
}
