//! What one caller can make the API do (issue 15): nothing is read before the caller's token is
//! checked, no message larger than its method needs is read at all, bad strings and bad tokens
//! are the caller's mistake, and every limit answers with a clear status: upload tokens issued
//! per user, watches per user, streams per connection, and streams end with their token.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::time::{Duration, SystemTime};

use common::stack::{Stack, Vars, bearer, route_request};
use follow_proto::{
    api::v1::{self as api, watch_image_status_request::Target},
    tonic::{Code, Status},
};
use follow_token::{UploadClaims, UploadGrant, UserClaims};
use tonic_types::StatusExt as _;
use uuid::Uuid;

const WITHIN: Duration = Duration::from_secs(20);

async fn create(
    stack: &Stack,
    request: tonic::Request<api::CreateRouteWithWaypointsRequest>,
) -> Result<api::CreateRouteWithWaypointsResponse, Status> {
    stack
        .routes()
        .await
        .create_route_with_waypoints(request)
        .await
        .map(tonic::Response::into_inner)
}

/// One grpc-web call of `path` with `message` (raw protobuf bytes): its `grpc-status` and
/// `grpc-message`.
async fn raw_call(stack: &Stack, path: &str, token: Option<&str>, message: &[u8]) -> (i32, String) {
    let mut body = Vec::with_capacity(message.len() + 5);
    body.push(0);
    body.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    body.extend_from_slice(message);
    let mut request = reqwest::Client::new()
        .post(format!("{}{path}", stack.url()))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let headers = response.headers().clone();
    let text = String::from_utf8_lossy(&response.bytes().await.unwrap()).into_owned();
    let field = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .or_else(|| {
                text.split("\r\n")
                    .find_map(|l| l.split_once(':').filter(|(k, _)| k.ends_with(name)))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let code = field("grpc-status").parse().unwrap();
    let message = percent_decode(&field("grpc-message"));
    (code, message)
}

fn percent_decode(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let escaped = (text.as_bytes()[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(text.as_bytes()[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `CreateRouteWithWaypointsRequest` whose `name` (field 2) is `name`, as raw bytes.
fn raw_create(request_id: &str, name: &[u8]) -> Vec<u8> {
    let mut m = vec![0x0a, u8::try_from(request_id.len()).unwrap()];
    m.extend_from_slice(request_id.as_bytes());
    m.push(0x12);
    let mut len = name.len();
    while len >= 0x80 {
        m.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    m.push(len as u8);
    m.extend_from_slice(name);
    m
}

const CREATE: &str = "/follow.api.v1.RouteService/CreateRouteWithWaypoints";

#[tokio::test]
async fn nothing_is_read_before_the_token_is_checked_nor_more_than_a_method_needs() {
    let stack = Stack::start().await;
    let token = stack.token("alice");
    let huge = raw_create("r1", &vec![b'a'; 4 << 20]);
    // Without a token a 4 MiB message is refused for the token, not for its size: it was not read.
    let (code, _) = raw_call(&stack, CREATE, None, &huge).await;
    assert_eq!(code, Code::Unauthenticated as i32);
    let (code, _) = raw_call(&stack, CREATE, Some("not-a-token"), &huge).await;
    assert_eq!(code, Code::Unauthenticated as i32);
    // With one, it is refused for its size before it is read.
    let (code, message) = raw_call(&stack, CREATE, Some(&token), &huge).await;
    assert_eq!(code, Code::OutOfRange as i32, "{message}");
    // A name that is not UTF-8 is the caller's mistake, naming the field.
    let (code, message) =
        raw_call(&stack, CREATE, Some(&token), &raw_create("r2", b"\xff\xfe")).await;
    assert_eq!(code, Code::InvalidArgument as i32, "{message}");
    assert!(message.contains("name"), "{message}");
    assert!(!message.to_lowercase().contains("internal"), "{message}");
}

#[tokio::test]
async fn nul_bytes_control_characters_and_bad_tokens_are_the_callers_mistake() {
    let stack = Stack::start().await;
    for (field, request) in [
        (
            "name",
            api::CreateRouteWithWaypointsRequest {
                name: "a\0b".into(),
                ..route_request(1)
            },
        ),
        (
            "request_id",
            api::CreateRouteWithWaypointsRequest {
                request_id: "id\u{7}".into(),
                ..route_request(1)
            },
        ),
    ] {
        let status = create(&stack, stack.as_user("alice", request))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let violations = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(violations[0].field, field);
    }
    let now = SystemTime::now();
    let sign = |claims: &UserClaims| stack.user_key.sign(claims).unwrap();
    let long_sub = sign(&UserClaims::new(
        "x".repeat(300),
        now,
        Duration::from_secs(60),
    ));
    let control_sub = sign(&UserClaims::new("a\nb", now, Duration::from_secs(60)));
    let from_the_future = sign(&UserClaims::new(
        "alice",
        now + Duration::from_secs(10 * 365 * 86_400),
        Duration::from_secs(60),
    ));
    // An upload token (another kind) signed with the right key is still not a user token.
    let upload = stack
        .user_key
        .sign(&UploadClaims::new(
            UploadGrant {
                sub: "alice".into(),
                image_id: Uuid::new_v4(),
                storage_key: "routes/x/images/y".into(),
                content_type: "image/jpeg".into(),
                max_file_size: 1,
            },
            now,
            Duration::from_secs(60),
        ))
        .unwrap();
    for token in [long_sub, control_sub, from_the_future, upload] {
        let status = create(&stack, bearer(route_request(1), &token))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
}

#[tokio::test]
async fn upload_tokens_issued_to_one_user_are_rate_limited_with_a_delay_to_retry_after() {
    let stack = Stack::start().await;
    // The default burst is 200 tokens: two whole routes at once, not a third.
    for _ in 0..2 {
        create(&stack, stack.as_user("alice", route_request(100)))
            .await
            .unwrap();
    }
    let status = create(&stack, stack.as_user("alice", route_request(100)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let delay = status
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(21),
        "at 300 a minute, 100 more come back within 20 s: {delay:?}"
    );
    let header: u64 = status
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(header, delay.as_secs().max(1));
    // A refused call costs nothing, and other users are apart.
    create(&stack, stack.as_user("bob", route_request(100)))
        .await
        .unwrap();
    create(&stack, stack.as_user("alice", route_request(1)))
        .await
        .unwrap();
}

fn watch(route_id: &str) -> api::WatchImageStatusRequest {
    api::WatchImageStatusRequest {
        target: Some(Target::RouteId(route_id.into())),
        resume_cursor: String::new(),
    }
}

#[tokio::test]
async fn a_user_holds_so_many_watches_and_each_ends_when_its_token_does() {
    let stack = Stack::start_with(
        Vars::from([
            ("FOLLOW_MAX_WATCHES_PER_USER", "2".into()),
            ("FOLLOW_TOKEN_LEEWAY_SECS", "0".into()),
        ]),
        false,
    )
    .await;
    let alice = create(&stack, stack.as_user("alice", route_request(1)))
        .await
        .unwrap();
    let bob = create(&stack, stack.as_user("bob", route_request(1)))
        .await
        .unwrap();
    let (alice_route, bob_route) = (alice.route.unwrap().id, bob.route.unwrap().id);
    let mut images = stack.images().await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = images
            .watch_image_status(stack.as_user("alice", watch(&alice_route)))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().unwrap();
        open.push(stream);
    }
    let status = images
        .watch_image_status(stack.as_user("alice", watch(&alice_route)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    images
        .watch_image_status(stack.as_user("bob", watch(&bob_route)))
        .await
        .unwrap();
    // A closed watch gives its slot back (once the server sees the stream reset).
    drop(open.pop());
    let _again = follow_testkit::eventually_async(WITHIN, "a freed watch slot", || {
        let mut images = images.clone();
        let request = stack.as_user("alice", watch(&alice_route));
        async move { images.watch_image_status(request).await.ok() }
    })
    .await;
    drop(open);

    // A watch opened with a token that expires in 2 s ends then, UNAUTHENTICATED.
    let short = stack
        .user_key
        .sign(&UserClaims::new(
            "bob",
            SystemTime::now(),
            Duration::from_secs(2),
        ))
        .unwrap();
    let mut stream = images
        .watch_image_status(bearer(watch(&bob_route), &short))
        .await
        .unwrap()
        .into_inner();
    let ended = follow_testkit::stream_end(&mut stream, WITHIN).await;
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
}

#[tokio::test]
async fn each_connection_is_told_how_many_streams_it_may_open() {
    let stack = Stack::start_with(
        Vars::from([("FOLLOW_MAX_STREAMS_PER_CONNECTION", "7".into())]),
        false,
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(stack.addr).await.unwrap();
    let (mut client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let request = http::Request::post("/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    // Once an answer is in, the server's SETTINGS (sent first) have been read.
    tokio::select! {
        response = response => { response.unwrap(); }
        result = &mut connection => panic!("the connection ended: {result:?}"),
    }
    assert_eq!(connection.max_concurrent_send_streams(), 7);
}
