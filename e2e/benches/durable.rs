//! `./dev bench durable`: what durability costs, on a throwaway stack of release builds (Valkey,
//! PostgreSQL, Garage, the API and one or two gateways) on one machine.
//!
//! 1. **The 202**: time from the last byte of a body to the gateway's answer, for 1, 5 and 20 MB
//!    photos, beside a bare S3 PUT of the same bytes to the same Garage (a presigned URL), both
//!    sent the same way (one raw HTTP/1.1 request on a fresh connection, the body written at
//!    once, the clock started when the last byte is handed to the socket), interleaved, warmed
//!    up, `FOLLOW_BENCH_REPEATS` times each (default 20): p50 and p99, and the ratio.
//! 2. **Memory**: `FOLLOW_BENCH_SLOW` uploads (default 200) of 10 MB held open, each having sent
//!    64 KiB: the gateway's RSS growth per upload in flight.
//! 3. **Throughput**: `FOLLOW_BENCH_IMAGES` photos (default 200, 2 MP JPEGs) uploaded 16 at a time
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
    memory_per_upload(&mut platform, slow).await;
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
            let (accept, status) =
                timed_request(&target.upload_url, "PUT", "image/jpeg", &body).await;
            assert_eq!(status, 202, "{} bytes", body.len());
            let (put, status) = timed_request(presigned.uri(), "PUT", "image/jpeg", &body).await;
            assert_eq!(status, 200);
            if n >= 2 {
                ours.push(accept);
                bare.push(put);
            }
        }
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
    }
    println!("   (target: the 202 adds at most 20 % over the bare PUT)");
    user.clean_up(platform).await;
}

async fn memory_per_upload(platform: &mut Platform, slow: usize) {
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
            ],
        )
        .await
        .unwrap();
    let pid = platform.gateway_pid().unwrap();
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
    let before = rss_bytes(pid);
    let mut held = Vec::with_capacity(slow);
    for target in &targets {
        let rest = target.upload_url.strip_prefix("http://").unwrap();
        let (authority, path) = rest.split_at(rest.find('/').unwrap());
        let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
        let head = format!(
            "PUT {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: image/jpeg\r\n\
             content-length: {}\r\n\r\n",
            10 << 20
        );
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
    let after = rss_bytes(pid);
    println!(
        "\n2. {slow} uploads of 10 MB held open (64 KiB of each sent): gateway RSS {:.1} -> {:.1} MiB, \
         {:.1} KiB per upload in flight (target <= 256 KiB)",
        before as f64 / f64::from(1 << 20),
        after as f64 / f64::from(1 << 20),
        after.saturating_sub(before) as f64 / 1024.0 / slow as f64
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
        "\n3. {images} photos of {:.0} KiB (1600x1200) through two gateways, 16 uploads at a time:\n   \
         first byte -> every route READY {:.1} s = {:.1} images/s; the pipeline alone (decode + \
         resize + encode, summed over both gateways) {:.2} s = {:.1} images/s per core",
        photo.len() as f64 / 1024.0,
        elapsed,
        images as f64 / elapsed,
        pipeline,
        images as f64 / pipeline
    );
    user.clean_up(platform).await;
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
