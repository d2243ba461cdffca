//! Resumable uploads (tus 1.0.0) against a real gateway, Valkey and Garage: chunks stored as they
//! come, the protocol's refusals, a bad first chunk, termination, expiry, the per-user bound.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, Vars, WITHIN, jpeg};
use follow_bus::ResultOutcome;
use follow_service::objects;
use follow_testkit::eventually_async;
use reqwest::{Client, Method, Response};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

/// A JPEG of `bytes` bytes: a real image, then a trailer after its end (as some cameras write).
fn big_jpeg(bytes: usize) -> Vec<u8> {
    let mut body = jpeg(640, 480);
    body.resize(bytes, 0x5A);
    body
}

/// A tus client's requests, by hand.
struct Tus {
    client: Client,
    base: String,
}

impl Tus {
    fn new(gw: &Gateway) -> Self {
        Self {
            client: Client::new(),
            base: gw.url(),
        }
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .header("tus-resumable", "1.0.0")
    }

    async fn create(&self, token: &str, length: usize) -> Response {
        self.request(Method::POST, &format!("/upload?token={token}"))
            .header("upload-length", length.to_string())
            .send()
            .await
            .unwrap()
    }

    /// Creates an upload; its path.
    async fn created(&self, token: &str, length: usize) -> String {
        let response = self.create(token, length).await;
        assert_eq!(response.status(), 201, "{:?}", response.text().await);
        assert_eq!(header(&response, "upload-offset"), "0");
        assert!(!header(&response, "upload-expires").is_empty());
        header(&response, "location")
    }

    async fn patch(&self, path: &str, offset: usize, bytes: &[u8]) -> Response {
        self.request(Method::PATCH, path)
            .header("upload-offset", offset.to_string())
            .header("content-type", "application/offset+octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap()
    }

    async fn head(&self, path: &str) -> Response {
        self.request(Method::HEAD, path).send().await.unwrap()
    }

    async fn offset(&self, path: &str) -> u64 {
        let response = self.head(path).await;
        assert_eq!(response.status(), 200);
        header(&response, "upload-offset").parse().unwrap()
    }
}

fn header(response: &Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Objects under `prefix` in the bucket.
async fn objects_under(gw: &Gateway, prefix: &str) -> usize {
    let listed = gw
        .s3
        .list_objects_v2()
        .bucket(gw.garage.bucket())
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    listed.contents().len()
}

fn small_parts() -> Vars {
    Vars::from([("FOLLOW_UPLOAD_PART_BYTES", (5 << 20).to_string())])
}

#[tokio::test]
async fn a_photo_sent_in_chunks_is_stored_in_parts_and_processed_once_with_its_sha256() {
    let gw = Gateway::start_with(small_parts()).await;
    let tus = Tus::new(&gw);
    let options = tus
        .request(Method::OPTIONS, "/upload")
        .send()
        .await
        .unwrap();
    assert_eq!(options.status(), 204);
    assert_eq!(header(&options, "tus-version"), "1.0.0");
    assert!(header(&options, "tus-extension").contains("creation-with-upload"));
    let body = big_jpeg(13_000_000);
    let (id, token) = gw.token("image/jpeg", 20_000_000);
    let path = tus.created(&token, body.len()).await;
    // Chunks that are not parts: each leaves a tail, which the next takes up.
    let mut offset = 0;
    for chunk in body.chunks(3_000_000) {
        let response = tus.patch(&path, offset, chunk).await;
        assert_eq!(response.status(), 204, "{:?}", response.text().await);
        offset += chunk.len();
        assert_eq!(header(&response, "upload-offset"), offset.to_string());
        if offset < body.len() {
            assert_eq!(tus.offset(&path).await, offset as u64);
        }
    }
    let result = gw.result(id).await;
    let ResultOutcome::Processed(processed) = &result.outcome else {
        panic!("{result:?}");
    };
    assert_eq!(processed.sha256, hex::encode(Sha256::digest(&body)));
    assert_eq!(gw.jobs_of(id).await, 1, "queued once");
    // A client that lost the last answer learns the upload completed, and cannot undo it.
    let head = tus.head(&path).await;
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "upload-offset"), body.len().to_string());
    assert_eq!(
        header(&head, "upload-expires"),
        "",
        "a finished upload does not expire"
    );
    let again = tus.patch(&path, body.len(), &[]).await;
    assert_eq!(again.status(), 204);
    assert_eq!(header(&again, "upload-offset"), body.len().to_string());
    assert_eq!(tus.patch(&path, 0, &body[..10]).await.status(), 409);
    let deleted = tus.request(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(deleted.status(), 409, "{:?}", deleted.text().await);
    assert_eq!(gw.jobs_of(id).await, 1, "still queued once");
    let partial = objects::partial_key(&gw.storage_key(id), "");
    assert_eq!(objects_under(&gw, &partial).await, 0, "no tail left");
}

#[tokio::test]
async fn the_protocol_refuses_what_it_must_and_nothing_is_spent() {
    let gw = Gateway::start().await;
    let tus = Tus::new(&gw);
    let body = jpeg(320, 240);
    let (_, token) = gw.token("image/jpeg", 1_000_000);
    let no_version = tus
        .client
        .post(format!("{}/upload?token={token}", gw.url()))
        .header("upload-length", "10")
        .send()
        .await
        .unwrap();
    assert_eq!(no_version.status(), 412);
    assert_eq!(header(&no_version, "tus-version"), "1.0.0");
    assert_eq!(tus.create(&token, 2_000_000).await.status(), 413);
    let no_length = tus
        .request(Method::POST, &format!("/upload?token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_length.status(), 400);
    let path = tus.created(&token, body.len()).await;
    assert_eq!(tus.patch(&path, 5, &body[..10]).await.status(), 409);
    assert_eq!(tus.offset(&path).await, 0);
    let unknown = format!(
        "/upload/{}{}",
        Uuid::new_v4().simple(),
        Uuid::new_v4().simple()
    );
    assert_eq!(tus.head(&unknown).await.status(), 404);
    let wrong_nonce = format!("{}{}", &path[..path.len() - 32], Uuid::new_v4().simple());
    assert_eq!(tus.patch(&wrong_nonce, 0, &body).await.status(), 404);
    let too_much = [body.clone(), vec![0; 10]].concat();
    assert_eq!(tus.patch(&path, 0, &too_much).await.status(), 400);
    // A second upload of the same token while this one is open: refused, saying so.
    let says_open = |status: u16, said: serde_json::Value| {
        assert_eq!(status, 409, "{said}");
        let message = said["message"].as_str().unwrap();
        assert!(message.contains("resumable upload"), "{said}");
    };
    let second = tus.create(&token, body.len()).await;
    says_open(second.status().as_u16(), second.json().await.unwrap());
    let (status, said) = gw.put(&token, "image/jpeg", body.clone()).await;
    says_open(status, said);
    // Abandoned: gone, and the token starts again.
    let deleted = tus.request(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(tus.head(&path).await.status(), 404);
    let again = tus.created(&token, body.len()).await;
    let done = tus.patch(&again, 0, &body).await;
    assert_eq!(done.status(), 204);
    assert_eq!(header(&done, "upload-offset"), body.len().to_string());
}

#[tokio::test]
async fn a_bad_first_chunk_fails_the_image_at_once_and_its_upload_is_gone() {
    let gw = Gateway::start().await;
    let tus = Tus::new(&gw);
    let (id, token) = gw.token("image/jpeg", 10_000_000);
    let path = tus.created(&token, 5_000_000).await;
    let png = common::png_with_alpha(64, 64);
    let refused = tus.patch(&path, 0, &png).await;
    assert_eq!(refused.status(), 415);
    let result = gw.result(id).await;
    assert!(
        matches!(result.outcome, ResultOutcome::Failed(_)),
        "{result:?}"
    );
    assert_eq!(tus.head(&path).await.status(), 404);
    assert_eq!(
        tus.create(&token, 5_000_000).await.status(),
        409,
        "the token is spent"
    );
}

#[tokio::test]
async fn an_expired_upload_is_swept_its_bytes_removed_and_its_token_starts_again() {
    let gw = Gateway::start_with(Vars::from([
        ("FOLLOW_RESUMABLE_EXPIRY_SECS", "2".to_owned()),
        ("FOLLOW_RESUMABLE_SWEEP_SECS", "1".to_owned()),
    ]))
    .await;
    let tus = Tus::new(&gw);
    let body = big_jpeg(2_000_000);
    let (id, token) = gw.token("image/jpeg", 10_000_000);
    let path = tus.created(&token, body.len()).await;
    assert_eq!(tus.patch(&path, 0, &body[..1_000_000]).await.status(), 204);
    let partial = objects::partial_key(&gw.storage_key(id), "");
    assert_eq!(objects_under(&gw, &partial).await, 1, "the tail is stored");
    eventually_async(WITHIN, "the expired upload swept", || async {
        (objects_under(&gw, &partial).await == 0).then_some(())
    })
    .await;
    let status = tus.head(&path).await.status();
    assert!(status == 404 || status == 410, "{status}");
    let mut valkey = gw.valkey_server.connection().await;
    let record: Option<String> = redis::cmd("GET")
        .arg(gw.valkey.partitions().resumable(id))
        .query_async(&mut valkey)
        .await
        .unwrap();
    assert_eq!(record, None);
    let again = tus.created(&token, body.len()).await;
    assert_eq!(tus.patch(&again, 0, &body).await.status(), 204);
}

#[tokio::test]
async fn a_user_holds_so_many_open_uploads_on_every_instance_together() {
    let vars = Vars::from([("FOLLOW_RESUMABLE_PER_USER", "2".to_owned())]);
    let gw = Gateway::start_with(vars).await;
    let tus = Tus::new(&gw);
    let mut paths = Vec::new();
    for _ in 0..2 {
        let (_, token) = gw.token("image/jpeg", 1_000_000);
        paths.push(tus.created(&token, 1000).await);
    }
    let (_, third) = gw.token("image/jpeg", 1_000_000);
    let refused = tus.create(&third, 1000).await;
    assert_eq!(refused.status(), 429);
    assert!(!header(&refused, "retry-after").is_empty());
    let (_, someone_else) = gw.token_of(
        "bob",
        "image/jpeg",
        1_000_000,
        std::time::Duration::from_secs(600),
    );
    assert_eq!(tus.create(&someone_else, 1000).await.status(), 201);
    let deleted = tus.request(Method::DELETE, &paths[0]).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(tus.create(&third, 1000).await.status(), 201, "room again");
}
