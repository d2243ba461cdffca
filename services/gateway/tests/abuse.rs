//! What one caller can make the gateway do (issue 15): one user's slow uploads never stop
//! another user's, one upload token holds so many watches, a watch ends with its token, and
//! every refusal — the framework's included — is a JSON `{error_code, message}`.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::{Gateway, Vars, WITHIN, bearer, jpeg};
use follow_proto::{
    gateway::v1::{WatchUploadRequest, gateway_service_client::GatewayServiceClient},
    tonic::{Code, Request},
};
use tokio::io::AsyncWriteExt as _;

const HOUR: Duration = Duration::from_secs(3600);

/// An upload that sent its head and a little of its body, then holds its connection.
async fn hold_upload(gw: &Gateway, token: &str) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "PUT /upload?token={token} HTTP/1.1\r\nhost: x\r\ncontent-type: image/jpeg\r\n\
         content-length: 1000000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&jpeg(64, 64)[..100]).await.unwrap();
    stream
}

#[tokio::test]
async fn one_users_slow_uploads_never_stop_another_users_upload() {
    let gw = Gateway::start_with(Vars::from([("FOLLOW_MAX_UPLOADS_PER_USER", "3".into())])).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let (_, token) = gw.token_of("mallory", "image/jpeg", 2_000_000, HOUR);
        held.push(hold_upload(&gw, &token).await);
    }
    // Once mallory's share is in use, her next upload is refused, spending nothing …
    let (_, token) = gw.token_of("mallory", "image/jpeg", 2_000_000, HOUR);
    let refused = follow_testkit::eventually_async(WITHIN, "mallory's share in use", || {
        let client = reqwest::Client::new();
        let url = format!("{}/upload?token={token}", gw.url());
        async move {
            let response = client
                .put(url)
                .header("content-type", "image/jpeg")
                .body(jpeg(32, 32))
                .send()
                .await
                .ok()?;
            (response.status() == 429).then_some(response)
        }
    })
    .await;
    let retry_after = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .to_owned();
    let answer: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(answer["error_code"], "RATE_LIMITED", "{answer}");
    assert!(retry_after.parse::<u64>().unwrap() >= 1);
    // … while alice's goes through.
    let (_, alice) = gw.token_of("alice", "image/jpeg", 2_000_000, HOUR);
    let (status, answer) = gw.put(&alice, "image/jpeg", jpeg(64, 64)).await;
    assert_eq!(status, 202, "{answer}");
    // When mallory lets go, her refused token works: it was not spent.
    drop(held);
    follow_testkit::eventually_async(WITHIN, "mallory's share free again", || async {
        (gw.put(&token, "image/jpeg", jpeg(32, 32)).await.0 == 202).then_some(())
    })
    .await;
}

fn watch(token: &str) -> Request<WatchUploadRequest> {
    bearer(WatchUploadRequest {}, token)
}

#[tokio::test]
async fn an_upload_token_holds_so_many_watches_and_they_end_when_it_expires() {
    let gw = Gateway::start_with(Vars::from([
        ("FOLLOW_MAX_WATCHES_PER_UPLOAD", "2".into()),
        ("FOLLOW_TOKEN_LEEWAY_SECS", "0".into()),
    ]))
    .await;
    let channel = gw.channel().await;
    let mut client = GatewayServiceClient::new(channel);
    // An image never uploaded: its watches stay open until the token expires in 3 s.
    let (_, token) = gw.token_of("alice", "image/jpeg", 1000, Duration::from_secs(3));
    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(
            client
                .watch_upload(watch(&token))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let status = client.watch_upload(watch(&token)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    for stream in &mut open {
        let ended = follow_testkit::stream_end(stream, WITHIN).await;
        assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    }
}

#[tokio::test]
async fn every_refusal_is_json_even_the_frameworks() {
    let gw = Gateway::start().await;
    let client = reqwest::Client::new();
    let json = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let kind = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        let body: serde_json::Value = response.json().await.unwrap();
        (
            status,
            kind,
            body["error_code"].as_str().unwrap_or_default().to_owned(),
        )
    };
    let (status, kind, code) = json(
        client
            .get(format!("{}/nope", gw.url()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, kind.as_str(), code.as_str()),
        (404, "application/json", "NOT_FOUND")
    );
    let (status, _, code) = json(
        client
            .get(format!("{}/upload", gw.url()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code.as_str()), (405, "METHOD_NOT_ALLOWED"));
    // Two different tokens: which one is meant is not guessed.
    let (_, a) = gw.token("image/jpeg", 1000);
    let (_, b) = gw.token("image/jpeg", 1000);
    // A repeated `token=` is refused even when both copies are equal; a partial body
    // (`Content-Range`) is refused before anything is spent.
    for (request, expected) in [
        (
            client
                .put(format!("{}/upload?token={a}", gw.url()))
                .bearer_auth(&b),
            "INVALID_TOKEN",
        ),
        (
            client.put(format!("{}/upload?token={a}&token={b}", gw.url())),
            "INVALID_TOKEN",
        ),
        (
            client.put(format!("{}/upload?token={a}&token={a}", gw.url())),
            "INVALID_TOKEN",
        ),
        (
            client
                .put(format!("{}/upload?token={a}", gw.url()))
                .header("content-range", "bytes 0-99/200"),
            "BAD_REQUEST",
        ),
    ] {
        let response = request
            .header("content-type", "image/jpeg")
            .body(jpeg(8, 8))
            .send()
            .await
            .unwrap();
        let (status, _, code) = json(response).await;
        assert_eq!((status, code.as_str()), (400, expected));
    }
    // The query's token and the same one in `Authorization` are one token, still unused.
    let response = client
        .put(format!("{}/upload?token={a}", gw.url()))
        .bearer_auth(&a)
        .header("content-type", "image/jpeg")
        .body(jpeg(8, 8))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    // A gRPC call to a service this server does not have is gRPC's UNIMPLEMENTED.
    let response = client
        .post(format!("{}/follow.nope.v1.Nope/Call", gw.url()))
        .header("content-type", "application/grpc-web+proto")
        .body(vec![0, 0, 0, 0, 0])
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["grpc-status"], "12");
}
