//! The platform driven by its own clients: the TypeScript SDK over grpc-web, the web page in
//! Chromium, and the page's dev token kept to its own API.
#![allow(clippy::unwrap_used)]

use follow_e2e::{Platform, user::User};
use follow_proto::events::v1 as events;

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the repository's Node script `script` (built by `./dev sdk`) with `args`; expects
/// success and returns the JSON summary it prints last.
async fn node<const N: usize>(script: &str, args: [&std::ffi::OsStr; N]) -> serde_json::Value {
    let script = repo().join(script);
    assert!(
        script.is_file(),
        "{} is missing: run ./dev sdk (./dev test does)",
        script.display()
    );
    let out = tokio::process::Command::new("node")
        .arg(&script)
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// The TypeScript SDK generated from the contracts (`sdk/typescript`, built by `./dev sdk`)
/// drives the platform as a browser would — grpc-web and fetch: a route, its live watch, the
/// upload, every stage, READY, and the preview.
#[tokio::test]
async fn the_typescript_sdk_drives_the_platform_over_grpc_web() {
    let platform = Platform::start().await.unwrap();
    let user = User::new(&platform).await;
    let photo = repo().join("demo/photo.jpg");
    let summary = node(
        "sdk/typescript/dist/smoke.js",
        [
            platform.api_url.as_ref(),
            user.token.as_ref(),
            photo.as_os_str(),
        ],
    )
    .await;
    let stages: Vec<&str> = summary["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert_eq!(
        stages,
        [
            "QUEUED",
            "WAITING_UPLOAD",
            "VALIDATING",
            "DECODING",
            "PROCESSING",
            "ENCODING",
            "UPLOADING_TO_STORAGE",
            "DONE"
        ]
    );
    assert_eq!(summary["previewStatus"], 200);
    assert_eq!(summary["previewType"], "image/jpeg");
    user.clean_up(&platform).await;
}

/// The demo page (`web/`, on the generated SDK) in headless Chromium, driven by Playwright:
/// signed in with a dev token, two photos chosen, the route created — and the page ends showing
/// every image DONE with its preview loaded and the route READY.
#[tokio::test]
async fn the_web_page_in_chromium_shows_every_photo_processed() {
    let platform = Platform::start().await.unwrap();
    let page = repo().join("web/dist/app.js");
    assert!(
        page.is_file(),
        "{} is missing: run ./dev sdk (./dev test does)",
        page.display()
    );
    let user = User::new(&platform).await;
    let photo = repo().join("demo/photo.jpg");
    let summary = node(
        "web/test/browser.mjs",
        [
            platform.api_url.as_ref(),
            user.token.as_ref(),
            photo.as_os_str(),
            photo.as_os_str(),
        ],
    )
    .await;
    assert_eq!(summary["route"], "READY");
    let images = summary["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for image in images {
        assert_eq!(image["stage"], "DONE");
        assert_eq!(image["uploaded"], 1);
        assert!(image["preview"].as_u64().unwrap() > 0);
        assert_eq!(
            image["placeholder"], true,
            "the preview's ThumbHash painted under it"
        );
        // The smaller of the two previews (JPEG and WebP: Chromium shows both).
        let id = image["id"].as_str().unwrap();
        let smallest = user
            .image(&platform, id)
            .await
            .files
            .into_iter()
            .filter(|f| f.role() == events::OutputRole::Preview)
            .min_by_key(|f| f.byte_size)
            .unwrap();
        assert_eq!(image["previewType"], smallest.content_type.as_str());
    }
    assert_eq!(
        summary["imageTypes"], "image/jpeg,image/png,image/webp",
        "Chromium decodes the SDK's WebP probe"
    );
    user.clean_up(&platform).await;
}

/// The demo page's resumable upload in headless Chromium, its connection cut a third of the way
/// (by a TCP proxy): the upload resumes where the gateway had stored up to and the photo ends
/// processed, the route READY.
#[tokio::test]
async fn the_web_pages_upload_resumes_after_its_connection_is_cut() {
    let platform = Platform::start().await.unwrap();
    let user = User::new(&platform).await;
    let dir = tempfile::tempdir().unwrap();
    let photo = dir.path().join("big.jpg");
    let mut body = std::fs::read(repo().join("demo/photo.jpg")).unwrap();
    body.resize(6_000_000, 0x3C);
    std::fs::write(&photo, &body).unwrap();
    let summary = node(
        "web/test/resume.mjs",
        [
            platform.api_url.as_ref(),
            user.token.as_ref(),
            photo.as_os_str(),
        ],
    )
    .await;
    assert_eq!(summary["route"], "READY", "{summary}");
    assert_eq!(summary["stage"], "DONE", "{summary}");
    let tus = &summary["tus"];
    assert_eq!(tus["POST"], 1, "never started over: {summary}");
    assert_eq!(tus["cut"], 1, "the connection was cut: {summary}");
    assert!(tus["HEAD"].as_u64().unwrap() >= 1, "{summary}");
    assert!(
        !tus["resumedAt"].as_array().unwrap().is_empty(),
        "resumed at a non-zero offset: {summary}"
    );
    user.clean_up(&platform).await;
}

/// The dev token the page is served with (config.json of `./dev up`) is only ever sent to its own
/// loopback API: not to an API named by `?api=`, nor to one typed into the page.
#[tokio::test]
async fn the_web_pages_dev_token_never_goes_to_another_origin() {
    let photo = repo().join("demo/photo.jpg");
    let summary = node("web/test/token-binding.mjs", [photo.as_os_str()]).await;
    assert_eq!(summary["queryApi"]["token"], "", "{summary}");
    assert!(
        summary["queryApi"]["note"]
            .as_str()
            .unwrap()
            .contains("sent only to"),
        "{summary}"
    );
    assert!(
        summary["queryApi"]["bRequests"].as_u64().unwrap() > 0,
        "the page called the other API, without the token: {summary}"
    );
    assert!(
        summary["editedApi"]["error"]
            .as_str()
            .unwrap()
            .contains("only sent to"),
        "{summary}"
    );
    assert_eq!(summary["bSawToken"], false, "{summary}");
    assert_eq!(summary["aSawToken"], true, "the control: {summary}");
}
