//! `./dev bench durable`: what durability costs, on a throwaway stack of release builds (Valkey,
//! PostgreSQL, Garage, the API and one or two gateways) on one machine.
//!
//! 1. **The 202**: time from the last byte of a body to the gateway's answer, for 1, 5 and 20 MB
//!    photos, beside a bare S3 PUT of the same bytes to the same Garage (a presigned URL), both
//!    sent the same way (one raw HTTP/1.1 request on a fresh connection, the body written at
//!    once, the clock started when the last byte is handed to the socket), interleaved, warmed
//!    up, each once the photos before are processed, `FOLLOW_BENCH_REPEATS` times each (default
//!    20): p50 and p99, and the ratio; then the
//!    gateway's mean time in each step of accepting them (`follow_gateway_upload_step_seconds`).
//! 2. **Memory**: `FOLLOW_BENCH_SLOW` uploads (default 200) of 10 MB held open, each having sent
//!    64 KiB: the growth per upload in flight of the gateway's heap (its allocator's count,
//!    `follow_gateway_heap_bytes`) and RSS.
//! 3. **Resumable**: a 20 MiB photo in 5 MiB chunks, `FOLLOW_BENCH_RESUMABLE` times (default 5)
//!    after one warm-up, interleaved: resumable (`POST`, then one `PATCH` per chunk, on one
//!    keep-alive connection), a single `PUT` of the whole photo, and the floor: a bare S3
//!    multipart upload of the same parts to the same Garage (create, one part per chunk,
//!    complete, with the SDK). First byte to last answer, p50, and the ratios. Then the memory of
//!    `FOLLOW_BENCH_SLOW` appends held open, as in 2.
//! 4. **Throughput** (and the S3 requests each photo cost, from the services' counters): `FOLLOW_BENCH_IMAGES` photos (default 200, 2 MP JPEGs) uploaded 16 at a time
//!    through two gateways, from the first byte to the last route READY; beside it, the same
//!    images' pipeline time alone (the gateways' decode + processing + encode stage seconds).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use follow_e2e::{Platform, client::jpeg, rss_bytes, user::User};
use follow_proto::api::v1 as api;
use follow_testkit::setting;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo bench` probes harness=false targets with these.
    }
    let repeats = setting("FOLLOW_BENCH_REPEATS", 20).max(2);
    let slow = setting("FOLLOW_BENCH_SLOW", 200);
    let images = setting("FOLLOW_BENCH_IMAGES", 200).max(1);
    let mut platform = Platform::start().await.unwrap();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let garage = std::env::var("FOLLOW_GARAGE").unwrap_or_else(|_| "garage on PATH".into());
    println!(
        "durable uploads: release builds, one machine ({cores} cores shared by every server, \
         the clients and the bench), Garage on loopback ({garage})"
    );

    accept_latency(&platform, repeats).await;
    memory_per_upload(&mut platform, slow, false).await;
    resumable(&platform, setting("FOLLOW_BENCH_RESUMABLE", 5).max(1)).await;
    memory_per_upload(&mut platform, slow, true).await;
    throughput(&mut platform, images).await;
}

/// One HTTP/1.1 request on a fresh connection: the time from the last body byte handed to the
/// socket to the status line, and the status.
async fn timed_request(
    url: &str,
    method: &str,
    content_type: &str,
    body: &[u8],
) -> (Duration, u16) {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: {content_type}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    // A refusal may come (and the connection close) before the whole body is written: the
    // status read below says which.
    let written = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await
    };
    let _ = written.await;
    let sent = Instant::now();
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).await.unwrap();
    let elapsed = sent.elapsed();
    let status = std::str::from_utf8(&first[9..12]).unwrap().parse().unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
    (elapsed, status)
}

/// A JPEG of about `bytes` with a photo's bytes per pixel (grain over a gradient): smooth
/// synthetic images compress so well that 5 MB of them would be over the pixel limit.
fn photo_of(bytes: usize) -> Vec<u8> {
    let mut side = 512u32;
    loop {
        let (width, height) = (side * 4 / 3, side);
        let grainy = image::ImageBuffer::from_fn(width, height, |x, y| {
            let grain = x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(2_246_822_519);
            let grain = (grain ^ (grain >> 15)).wrapping_mul(668_265_263) >> 25; // 0..128
            let base = |v: u32, of: u32| (v * 127 / of) as u8;
            image::Rgb([
                base(x, width).saturating_add(grain as u8),
                base(y, height).saturating_add(grain as u8),
                base(x + y, width + height).saturating_add((grain >> 1) as u8),
            ])
        });
        let mut photo = Vec::new();
        image::DynamicImage::ImageRgb8(grainy)
            .write_to(
                &mut std::io::Cursor::new(&mut photo),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        if photo.len() >= bytes {
            return photo;
        }
        side = (f64::from(side) * (bytes as f64 / photo.len() as f64).sqrt().max(1.01)) as u32;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn accept_latency(platform: &Platform, repeats: usize) {
    let (s3, bucket) = platform.bucket().unwrap();
    let mut user = User::new(platform).await;
    println!("\n1. last body byte -> answer, {repeats} runs each after 2 warm-up, interleaved:");
    println!(
        "{:>8} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "photo", "202 p50 ms", "202 p99 ms", "PUT p50 ms", "PUT p99 ms", "202 / PUT"
    );
    let mut before = upload_steps(platform).await;
    for megabytes in [1usize, 5, 20] {
        let body = photo_of(megabytes << 20);
        let waypoints = vec![(0.5, 0.5); repeats + 2];
        let created = user
            .create_route_sized(platform, &waypoints, 25_000_000)
            .await;
        let (mut ours, mut bare) = (Vec::new(), Vec::new());
        for (n, target) in created.upload_targets.iter().enumerate() {
            let presigned = s3
                .put_object()
                .bucket(&bucket)
                .key(format!("bench/{}", target.image_id))
                .content_type("image/jpeg")
                .presigned(
                    aws_sdk_s3::presigning::PresigningConfig::expires_in(Duration::from_secs(600))
                        .unwrap(),
                )
                .await
                .unwrap();
            // Each side on a machine at rest: the photo before is processed (its decoding would
            // share the cores with this upload).
            processed(platform).await;
            let (accept, status) =
                timed_request(&target.upload_url, "PUT", "image/jpeg", &body).await;
            assert_eq!(status, 202, "{} bytes", body.len());
            processed(platform).await;
            let (put, status) = timed_request(presigned.uri(), "PUT", "image/jpeg", &body).await;
            assert_eq!(status, 200);
            if n >= 2 {
                ours.push(accept);
                bare.push(put);
            }
        }
        let steps = upload_steps(platform).await;
        ours.sort();
        bare.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{:>5.1} MB {:>12.1} {:>12.1} {:>12.1} {:>12.1} {:>9.2}x",
            body.len() as f64 / f64::from(1 << 20),
            ms(percentile(&ours, 0.5)),
            ms(percentile(&ours, 0.99)),
            ms(percentile(&bare, 0.5)),
            ms(percentile(&bare, 0.99)),
            ms(percentile(&ours, 0.5)) / ms(percentile(&bare, 0.5))
        );
        let means: Vec<String> = UPLOAD_STEPS
            .iter()
            .zip(steps.iter().zip(&before))
            .map(|(step, ((sum, n), (sum0, n0)))| {
                format!("{step} {:.1}", (sum - sum0) * 1e3 / (n - n0).max(1.0))
            })
            .collect();
        println!("{:>8} the 202's steps, mean ms: {}", "", means.join(", "));
        before = steps;
    }
    println!("   (target: the 202 adds at most 20 % over the bare PUT)");
    user.clean_up(platform).await;
}

/// Waits until every job queued so far is processed.
async fn processed(platform: &Platform) {
    follow_testkit::eventually_async(Duration::from_secs(600), "the jobs processed", || async {
        let mut left = 0.0;
        for name in [
            "follow_gateway_jobs_waiting",
            "follow_gateway_jobs_in_progress",
        ] {
            left += platform.metric(&platform.gateway_url, name).await.ok()?;
        }
        (left == 0.0).then_some(())
    })
    .await;
}

/// The steps of accepting an upload the gateway times (`follow_gateway_upload_step_seconds`).
const UPLOAD_STEPS: [&str; 6] = [
    "guard",
    "checks",
    "body",
    "store",
    "record_check",
    "enqueue",
];

/// The gateway's time in each upload step so far: (seconds, uploads) per step.
async fn upload_steps(platform: &Platform) -> Vec<(f64, f64)> {
    let mut totals = Vec::new();
    for step in UPLOAD_STEPS {
        let mut total = [0.0; 2];
        for (n, part) in ["sum", "count"].iter().enumerate() {
            let name = format!("follow_gateway_upload_step_seconds_{part}{{step=\"{step}\"}}");
            total[n] = platform
                .metric(&platform.gateway_url, &name)
                .await
                .unwrap_or(0.0);
        }
        totals.push((total[0], total[1]));
    }
    totals
}

/// A JPEG of exactly `bytes`: a photo of about two thirds of that, then a trailer after its end
/// (as some cameras write).
fn padded_photo(bytes: usize) -> Vec<u8> {
    let mut body = photo_of(bytes * 2 / 3);
    body.resize(bytes, 0x3C);
    body
}

async fn resumable(platform: &Platform, repeats: usize) {
    const CHUNK: usize = 5 << 20;
    let (s3, bucket) = platform.bucket().unwrap();
    let mut user = User::new(platform).await;
    let body = padded_photo(20 << 20);
    let created = user
        .create_route_sized(platform, &vec![(0.5, 0.5); 2 * (repeats + 1)], 25_000_000)
        .await;
    let client = reqwest::Client::new();
    let (mut tus, mut single, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for (n, pair) in created.upload_targets.chunks(2).enumerate() {
        let started = Instant::now();
        let made = client
            .post(&pair[0].upload_url)
            .header("tus-resumable", "1.0.0")
            .header("upload-length", body.len().to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(made.status(), 201);
        let location = made.headers()["location"].to_str().unwrap().to_owned();
        let url = format!("{}{location}", platform.gateway_url);
        for (i, chunk) in body.chunks(CHUNK).enumerate() {
            let sent = client
                .patch(&url)
                .header("tus-resumable", "1.0.0")
                .header("upload-offset", (i * CHUNK).to_string())
                .header("content-type", "application/offset+octet-stream")
                .body(chunk.to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(sent.status(), 204);
        }
        let resumable = started.elapsed();
        let started = Instant::now();
        let put = client
            .put(&pair[1].upload_url)
            .header("content-type", "image/jpeg")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 202);
        let whole = started.elapsed();
        let started = Instant::now();
        bare_multipart(&s3, &bucket, &format!("bench/parts-{n}"), &body, CHUNK).await;
        let bare = started.elapsed();
        if n >= 1 {
            tus.push(resumable);
            single.push(whole);
            floor.push(bare);
        }
    }
    for times in [&mut tus, &mut single, &mut floor] {
        times.sort();
    }
    let ms = |d: &[Duration]| percentile(d, 0.5).as_secs_f64() * 1e3;
    println!(
        "\n3. a {} MiB photo in {} MiB chunks, first byte -> last answer, p50 of {repeats} after a \
         warm-up, interleaved:\n   resumable (POST + {} PATCHes) {:.0} ms = {:.2}x the floor; single \
         PUT {:.0} ms = {:.2}x; bare S3 multipart of the same parts (the floor) {:.0} ms",
        body.len() >> 20,
        CHUNK >> 20,
        body.len().div_ceil(CHUNK),
        ms(&tus),
        ms(&tus) / ms(&floor),
        ms(&single),
        ms(&single) / ms(&floor),
        ms(&floor)
    );
    user.clean_up(platform).await;
}

/// `body` stored at `key` as an S3 multipart upload of `chunk`-byte parts.
async fn bare_multipart(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    body: &[u8],
    chunk: usize,
) {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    let upload = s3
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    let id = upload.upload_id().unwrap();
    let mut parts = Vec::new();
    for (n, part) in body.chunks(chunk).enumerate() {
        let number = i32::try_from(n + 1).unwrap();
        let stored = s3
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(id)
            .part_number(number)
            .body(part.to_vec().into())
            .send()
            .await
            .unwrap();
        parts.push(
            CompletedPart::builder()
                .part_number(number)
                .e_tag(stored.e_tag().unwrap())
                .build(),
        );
    }
    s3.complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .unwrap();
}

/// `slow` bodies of 10 MB held open, 64 KiB of each sent: single `PUT`s, or `PATCH`es of
/// resumable uploads.
async fn memory_per_upload(platform: &mut Platform, slow: usize, resumable: bool) {
    // Slow clients are not cut for their rate here, nor one user's share: they must all stay in
    // flight while measured.
    platform.stop(follow_e2e::Service::Gateway).await.unwrap();
    platform
        .start_service(
            follow_e2e::Service::Gateway,
            &[
                ("FOLLOW_MIN_UPLOAD_RATE", Some("1")),
                ("FOLLOW_BODY_IDLE_TIMEOUT_SECS", Some("120")),
                ("FOLLOW_MAX_RECEIVING", Some("1000")),
                ("FOLLOW_MAX_UPLOADS_PER_USER", Some("1000")),
                ("FOLLOW_RESUMABLE_PER_USER", Some("1000")),
            ],
        )
        .await
        .unwrap();
    let pid = platform.gateway_pid().unwrap();
    // The photos of the sections before are processed first: their decoding would be counted.
    processed(platform).await;
    let mut user = User::new(platform).await;
    let mut targets = Vec::new();
    while targets.len() < slow {
        let n = (slow - targets.len()).min(100);
        let created = user
            .create_route_sized(platform, &vec![(0.5, 0.5); n], 25_000_000)
            .await;
        targets.extend(created.upload_targets);
    }
    let start = photo_of(64 << 10);
    let client = reqwest::Client::new();
    let mut created = Vec::new();
    if resumable {
        for target in &targets {
            let made = client
                .post(&target.upload_url)
                .header("tus-resumable", "1.0.0")
                .header("upload-length", (10 << 20).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(made.status(), 201);
            created.push(made.headers()["location"].to_str().unwrap().to_owned());
        }
    }
    let heap = || async {
        platform
            .metric(&platform.gateway_url, "follow_gateway_heap_bytes")
            .await
            .unwrap()
    };
    let (before, heap_before) = (rss_bytes(pid), heap().await);
    let mut held = Vec::with_capacity(slow);
    for (n, target) in targets.iter().enumerate() {
        let rest = target.upload_url.strip_prefix("http://").unwrap();
        let (authority, path) = rest.split_at(rest.find('/').unwrap());
        let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
        let head = if resumable {
            format!(
                "PATCH {} HTTP/1.1\r\nhost: {authority}\r\ntus-resumable: 1.0.0\r\n\
                 upload-offset: 0\r\ncontent-type: application/offset+octet-stream\r\n\
                 content-length: {}\r\n\r\n",
                created[n],
                10 << 20
            )
        } else {
            format!(
                "PUT {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: image/jpeg\r\n\
                 content-length: {}\r\n\r\n",
                10 << 20
            )
        };
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&start[..64 << 10]).await.unwrap();
        held.push(stream);
    }
    // Every upload is in: the gateway counts them as being received.
    follow_testkit::eventually_async(
        Duration::from_secs(60),
        "every slow upload received",
        || async {
            let receiving = platform
                .metric(&platform.gateway_url, "follow_gateway_receiving")
                .await
                .unwrap();
            (receiving as usize == slow).then_some(())
        },
    )
    .await;
    let (after, heap_after) = (rss_bytes(pid), heap().await);
    let (section, what) = if resumable {
        ("3b", "resumable appends (PATCH)")
    } else {
        ("2", "uploads (PUT)")
    };
    println!(
        "\n{section}. {slow} {what} of 10 MB held open (64 KiB of each sent), per upload in flight \
         (target <= 128 KiB): heap {:.1} KiB (allocator's count, {:.1} -> {:.1} MiB), RSS {:.1} KiB \
         ({:.1} -> {:.1} MiB)",
        (heap_after - heap_before) / 1024.0 / slow as f64,
        heap_before / f64::from(1 << 20),
        heap_after / f64::from(1 << 20),
        after.saturating_sub(before) as f64 / 1024.0 / slow as f64,
        before as f64 / f64::from(1 << 20),
        after as f64 / f64::from(1 << 20),
    );
    drop(held);
    user.clean_up(platform).await;
}

async fn throughput(platform: &mut Platform, images: usize) {
    platform.stop(follow_e2e::Service::Gateway).await.unwrap();
    platform
        .start_service(follow_e2e::Service::Gateway, &[])
        .await
        .unwrap();
    let second = platform.add_gateway(&[]).await.unwrap();
    let mut user = User::new(platform).await;
    let mut targets = Vec::new();
    let mut routes = Vec::new();
    while targets.len() < images {
        let n = (images - targets.len()).min(100);
        let created = user
            .create_route_sized(platform, &vec![(0.5, 0.5); n], 25_000_000)
            .await;
        routes.push(created.route.unwrap().id);
        targets.extend(created.upload_targets);
    }
    let photo = jpeg(1600, 1200);
    let services = [&platform.gateway_url, &second, &platform.api_url];
    let s3_before = s3_requests(platform, &services).await;
    let pipeline_before = pipeline_seconds(platform, &[&platform.gateway_url, &second]).await;
    let started = Instant::now();
    let urls: Vec<String> = targets
        .iter()
        .enumerate()
        .map(|(n, t)| {
            if n % 2 == 0 {
                t.upload_url.clone()
            } else {
                t.upload_url.replace(&platform.gateway_url, &second)
            }
        })
        .collect();
    futures_util::future::join_all(urls.chunks(urls.len().div_ceil(16)).map(|chunk| {
        let (chunk, photo) = (chunk.to_vec(), photo.clone());
        async move {
            for url in chunk {
                follow_e2e::client::upload_accepted(&url, "image/jpeg", photo.clone()).await;
            }
        }
    }))
    .await;
    for route in &routes {
        user.wait_route(platform, route, api::RouteStatus::Ready)
            .await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let pipeline =
        pipeline_seconds(platform, &[&platform.gateway_url, &second]).await - pipeline_before;
    println!(
        "\n4. {images} photos of {:.0} KiB (1600x1200) through two gateways, 16 uploads at a time:\n   \
         first byte -> every route READY {:.1} s = {:.1} images/s; the pipeline alone (decode + \
         resize + encode, summed over both gateways) {:.2} s = {:.1} images/s per core",
        photo.len() as f64 / 1024.0,
        elapsed,
        images as f64 / elapsed,
        pipeline,
        images as f64 / pipeline
    );
    let s3_after = s3_requests(platform, &services).await;
    let per_photo: Vec<String> = s3_after
        .iter()
        .zip(&s3_before)
        .filter(|((_, after), (_, before))| after > before)
        .map(|((op, after), (_, before))| format!("{op} {:.2}", (after - before) / images as f64))
        .collect();
    let total: f64 = s3_after.iter().map(|(_, n)| n).sum::<f64>()
        - s3_before.iter().map(|(_, n)| n).sum::<f64>();
    println!(
        "   S3 requests per photo (gateways and API, from upload to READY): {:.2} ({})",
        total / images as f64,
        per_photo.join(", ")
    );
    user.clean_up(platform).await;
}

/// The S3 requests the services at `urls` made so far, by operation.
async fn s3_requests(platform: &Platform, urls: &[&String]) -> Vec<(&'static str, f64)> {
    let mut counts = Vec::new();
    for op in [
        "head",
        "get",
        "put",
        "delete",
        "start_multipart",
        "upload_part",
        "complete_multipart",
        "abort_multipart",
    ] {
        let mut total = 0.0;
        for url in urls {
            let prefix = if url.as_str() == platform.api_url {
                "follow_api"
            } else {
                "follow_gateway"
            };
            let name = format!("{prefix}_s3_requests_total{{op=\"{op}\"}}");
            total += platform.metric(url, &name).await.unwrap_or(0.0);
        }
        counts.push((op, total));
    }
    counts
}

/// The seconds the gateways at `urls` spent decoding, processing and encoding, so far.
async fn pipeline_seconds(platform: &Platform, urls: &[&String]) -> f64 {
    let mut total = 0.0;
    for url in urls {
        for stage in ["decoding", "processing", "encoding"] {
            let name = format!("follow_gateway_stage_seconds_sum{{stage=\"{stage}\"}}");
            total += platform.metric(url, &name).await.unwrap();
        }
    }
    total
}
