//! `./dev bench live`: live progress at scale, on one machine. A throwaway stack on one Valkey
//! node with two API instances (release builds); `FOLLOW_BENCH_STREAMS` watch streams (default
//! 10,000) on the first instance and `FOLLOW_BENCH_STREAMS_B` (default 1,000) on the second,
//! `FOLLOW_BENCH_WEB_PERCENT` (default 50) of each over grpc-web (HTTP/1.1, one connection per
//! stream) and the rest over native gRPC (HTTP/2, up to 100 streams per connection). Each stream
//! watches one image. A publisher then plays the gateways: every image goes through its six
//! in-flight stages (`HSET image:status` + `PUBLISH image:progress`, as the gateway does) at
//! `FOLLOW_BENCH_RATE` events/s (default 1,000).
//!
//! Prints events published and delivered, delivered/s, publish → client latency p50/p99/max, and
//! lost and duplicated events (each stream must see each stage of its image exactly once, in
//! order).
//!
//! Then memory per stream, native gRPC, grpc-web over HTTP/1.1 (a connection per stream, as
//! browsers speak it over plain HTTP) and grpc-web over HTTP/2 (up to 100 streams per connection,
//! as browsers speak it over TLS through a proxy that keeps HTTP/2) apart: each kind on a fresh
//! API instance of its own, streams opened in steps to 1k, 5k, 10k and 20k; at each step the
//! instance's RSS growth over the streams open, idle (every stream has its snapshot) and again
//! after traffic (every stream has been sent an event since), and the slope between steps. A
//! step the process limit on open files cannot hold (grpc-web over HTTP/1.1 is a connection per
//! stream) is printed as not run.
//!
//! Last, the first part again on a Valkey Cluster of three primaries and three replicas: the
//! same streams spread evenly over three API instances, progress published with `SPUBLISH`.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use follow_e2e::{
    Platform, ValkeyKind, channel,
    client::{bearer, watch_images},
    rss_bytes,
};
use follow_proto::{
    api::v1::{
        self as api, WaypointInput, image_service_client::ImageServiceClient,
        watch_image_status_response::Event,
    },
    events::v1::{ImageProgress, ProgressNotice, Stage, progress_notice},
    prost::Message,
    prost_types::Timestamp,
    tonic::{Request, Streaming, transport::Channel},
};

/// The stages a gateway reports while an image is in flight (the final one would end streams).
const STAGES: [(Stage, &str); 6] = [
    (Stage::WaitingUpload, "waiting_upload"),
    (Stage::Validating, "validating"),
    (Stage::Decoding, "decoding"),
    (Stage::Processing, "processing"),
    (Stage::Encoding, "encoding"),
    (Stage::UploadingToStorage, "uploading_to_storage"),
];
const SLOTS: usize = 10;

/// What one stream saw.
#[derive(Default)]
struct Seen {
    latencies_us: Vec<u32>,
    delivered: u64,
    duplicated: u64,
    lost: u64,
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo bench` probes harness=false targets with these.
    }
    let streams_a = follow_testkit::setting("FOLLOW_BENCH_STREAMS", 10_000);
    let streams_b = follow_testkit::setting("FOLLOW_BENCH_STREAMS_B", 1_000);
    let load = Load {
        rate: follow_testkit::setting("FOLLOW_BENCH_RATE", 1_000),
        images: follow_testkit::setting("FOLLOW_BENCH_IMAGES", 2_000).max(1),
        web_percent: follow_testkit::setting("FOLLOW_BENCH_WEB_PERCENT", 50).min(100),
    };

    let mut platform = Platform::start_on(ValkeyKind::Node).await.unwrap();
    let second = platform.add_api(&[]).await.unwrap();
    let token = platform.token("bench").await.unwrap();
    println!("live progress: one Valkey node, two API instances, one machine (2 shared cores)");
    let instances = [(platform.api_url.clone(), streams_a), (second, streams_b)];
    live(&platform, &token, &instances, &load).await;
    memory_per_stream(&mut platform, &token).await;
    drop(platform);

    // The same streams spread over three instances, the progress published with `SPUBLISH` on
    // the shard of each image's partition.
    let mut platform = Platform::start_on(ValkeyKind::Cluster).await.unwrap();
    let mut instances = vec![platform.api_url.clone()];
    for _ in 0..2 {
        instances.push(platform.add_api(&[]).await.unwrap());
    }
    let token = platform.token("bench").await.unwrap();
    let total = streams_a + streams_b;
    let instances: Vec<(String, usize)> = instances
        .into_iter()
        .enumerate()
        .map(|(i, url)| (url, total / 3 + usize::from(i < total % 3)))
        .collect();
    println!(
        "live progress: a Valkey Cluster (3 primaries, 3 replicas, {} partitions), three API instances",
        platform.partitions
    );
    live(&platform, &token, &instances, &load).await;
}

/// What the publisher plays, and how the streams are spread.
struct Load {
    /// Progress events published per second.
    rate: usize,
    /// Images watched (each stream watches one).
    images: usize,
    /// The share of streams over grpc-web (the rest native gRPC).
    web_percent: usize,
}

/// Opens `n` watch streams on each `(url, n)` of `instances`, publishes every image's stages at
/// the load's rate, and prints what the streams got.
async fn live(platform: &Platform, token: &str, instances: &[(String, usize)], load: &Load) {
    let Load {
        rate,
        images,
        web_percent,
    } = *load;
    let ids = create_images(platform, token, images).await;
    let index: std::collections::HashMap<String, usize> = ids
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, id)| (id, i))
        .collect();
    let index = Arc::new(index);

    // publish time of (image, stage), in µs since `epoch`; 0 = not yet.
    let epoch = Instant::now();
    let published: Arc<Vec<AtomicU64>> =
        Arc::new((0..images * SLOTS).map(|_| AtomicU64::new(0)).collect());

    // How many streams got their snapshot (are live).
    let (ready, mut live) = tokio::sync::watch::channel(0usize);
    let ready = Arc::new(ready);
    // Streams wait for every other to be open before they time out on silence.
    let (go, going) = tokio::sync::watch::channel(false);
    let mut channels: Vec<Vec<Channel>> = Vec::new();
    for (url, n) in instances {
        let mut list = Vec::new();
        for _ in 0..(n * (100 - web_percent) / 100).div_ceil(100).max(1) {
            list.push(channel(url).await.unwrap());
        }
        channels.push(list);
    }
    // Native streams first, then grpc-web ones.
    let opened = Instant::now();
    let mut tasks = Vec::new();
    for phase_web in [false, true] {
        for (instance, (url, n)) in instances.iter().enumerate() {
            for s in 0..*n {
                let web = s % 100 < web_percent;
                if web != phase_web {
                    continue;
                }
                let image = (s * 7919 + instance) % images;
                let id = ids[image].clone();
                let request = bearer(watch_images(&[&id]), token);
                let list = &channels[instance];
                let native = list[s % list.len()].clone();
                let url = url.clone();
                let (ready, published, index) = (ready.clone(), published.clone(), index.clone());
                let mut going = going.clone();
                tasks.push(tokio::spawn(async move {
                    let via = if web {
                        Via::Web(Box::new(follow_e2e::client::grpc_web()))
                    } else {
                        Via::Native(native)
                    };
                    let mut stream = open_watch(via, &url, request).await;
                    // The snapshot (`queued`) first: then the stream is live.
                    let first = stream.message().await.unwrap().unwrap();
                    assert!(matches!(first.event, Some(Event::ImageProgress(_))));
                    ready.send_modify(|n| *n += 1);
                    going.wait_for(|go| *go).await.unwrap();
                    follow(stream, epoch, &published, &index).await
                }));
            }
        }
        // A stream that failed to open ends its task with a panic: then this times out.
        let expected = tasks.len();
        tokio::time::timeout(Duration::from_secs(120), live.wait_for(|n| *n >= expected))
            .await
            .expect("every watch stream open within 2 minutes")
            .unwrap();
    }
    let open_s = opened.elapsed().as_secs_f64();
    go.send_replace(true);

    let (events, started) = (images * STAGES.len(), Instant::now());
    play(platform, &ids, rate, epoch, &published).await;
    let publish_s = started.elapsed().as_secs_f64();

    let mut all = Vec::new();
    let (mut delivered, mut lost, mut duplicated) = (0u64, 0u64, 0u64);
    for task in tasks {
        let seen = task.await.unwrap();
        delivered += seen.delivered;
        lost += seen.lost;
        duplicated += seen.duplicated;
        all.extend(seen.latencies_us);
    }
    let deliver_s = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let spread: Vec<String> = instances.iter().map(|(_, n)| n.to_string()).collect();
    println!(
        "  streams: {} over the instances, {web_percent}% grpc-web; {images} images; opened in {open_s:.1} s",
        spread.join(" + ")
    );
    println!(
        "  published {events} events in {publish_s:.1} s ({:.0}/s, target rate {rate}/s)",
        events as f64 / publish_s
    );
    println!(
        "  delivered {delivered} events to clients in {deliver_s:.1} s ({:.0}/s)",
        delivered as f64 / deliver_s
    );
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |&us| us as f64 / 1000.0)
    };
    println!(
        "  latency publish -> client: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target p99 < 50 ms)",
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    println!("  lost {lost}, duplicated {duplicated} (target 0 and 0)");
}

/// The gateways: every image of `ids` through its stages, paced at `rate` events per second,
/// each event's time noted in `published` (µs since `epoch`).
async fn play(
    platform: &Platform,
    ids: &[String],
    rate: usize,
    epoch: Instant,
    published: &[AtomicU64],
) {
    let mut valkey = platform.valkey().await.unwrap();
    // A fixed rate: a late tick is made up at once (`Burst`), as a schedule would.
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for (seq, (stage, name)) in STAGES.iter().enumerate() {
        for (image, id) in ids.iter().enumerate() {
            pace.tick().await;
            published[image * SLOTS + *stage as usize]
                .store(epoch.elapsed().as_micros() as u64, Relaxed);
            publish(&mut valkey, platform, id, seq, *stage, name).await;
        }
    }
}

/// Reads a live stream of one image until its last in-flight stage (or 5 s of silence): what
/// it got, lost and got twice, and each stage's latency from `published` (µs since `epoch`).
async fn follow(
    mut stream: Streaming<api::WatchImageStatusResponse>,
    epoch: Instant,
    published: &[AtomicU64],
    index: &std::collections::HashMap<String, usize>,
) -> Seen {
    let mut seen = Seen::default();
    let mut last = Stage::Queued as i32;
    while let Ok(Ok(Some(message))) =
        tokio::time::timeout(Duration::from_secs(5), stream.message()).await
    {
        let Some(Event::ImageProgress(p)) = message.event else {
            continue;
        };
        let now = epoch.elapsed().as_micros() as u64;
        let stage = p.stage;
        if stage <= last {
            seen.duplicated += 1;
            continue;
        }
        seen.lost += (stage - last - 1) as u64;
        last = stage;
        seen.delivered += 1;
        let at = published[index[&p.image_id] * SLOTS + stage as usize].load(Relaxed);
        if at > 0 {
            seen.latencies_us.push(now.saturating_sub(at) as u32);
        }
        if stage == Stage::UploadingToStorage as i32 {
            break;
        }
    }
    seen.lost += (Stage::UploadingToStorage as i32 - last).max(0) as u64;
    seen
}

/// The connection a watch stream goes over.
#[derive(Clone)]
enum Via {
    /// Native gRPC.
    Native(Channel),
    /// grpc-web, over HTTP/1.1 ([`follow_e2e::client::grpc_web`]: a connection per stream) or
    /// HTTP/2 ([`follow_e2e::client::grpc_web_h2`]: shared by the channel's streams).
    Web(Box<follow_e2e::client::GrpcWeb>),
}

/// A watch stream to the API at `url`.
async fn open_watch(
    via: Via,
    url: &str,
    request: Request<api::WatchImageStatusRequest>,
) -> Streaming<api::WatchImageStatusResponse> {
    match via {
        Via::Native(channel) => {
            ImageServiceClient::new(channel)
                .watch_image_status(request)
                .await
        }
        Via::Web(web) => {
            ImageServiceClient::with_origin(*web, url.parse().unwrap())
                .watch_image_status(request)
                .await
        }
    }
    .unwrap()
    .into_inner()
}

/// `n` images to watch, on routes of up to 100 waypoints.
async fn create_images(platform: &Platform, token: &str, n: usize) -> Vec<String> {
    let mut routes = platform.routes().await.unwrap();
    let mut ids: Vec<String> = Vec::with_capacity(n);
    while ids.len() < n {
        let count = (n - ids.len()).min(100);
        let request = api::CreateRouteWithWaypointsRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            name: "bench".into(),
            waypoints: (0..count)
                .map(|i| WaypointInput {
                    marker_x: i as f64 / 100.0,
                    marker_y: 0.5,
                    content_type: "image/jpeg".into(),
                    file_size: 1_000_000,
                })
                .collect(),
        };
        let created = routes
            .create_route_with_waypoints(bearer(request, token))
            .await
            .unwrap()
            .into_inner();
        ids.extend(created.upload_targets.into_iter().map(|t| t.image_id));
    }
    ids
}

/// What a gateway does when image `id` enters `stage`: the status hash and the progress notice,
/// in one transaction.
async fn publish(
    valkey: &mut follow_e2e::ValkeyConnection,
    platform: &Platform,
    id: &str,
    seq: usize,
    stage: Stage,
    name: &str,
) {
    let (partitions, uuid) = (platform.partitions, follow_e2e::observe::uuid(id));
    let progress = ImageProgress {
        image_id: id.to_owned(),
        stage: stage as i32,
        seq: seq as u64 + 2,
        time: Some(Timestamp::from(std::time::SystemTime::now())),
        ..Default::default()
    };
    let _: () = redis::pipe()
        .atomic()
        .hset_multiple(
            partitions.status(uuid),
            &[("stage", name.to_owned()), ("seq", (seq + 2).to_string())],
        )
        .ignore()
        .cmd(platform.publish_command())
        .arg(partitions.progress(uuid))
        .arg(
            ProgressNotice {
                notice: Some(progress_notice::Notice::Progress(progress)),
            }
            .encode_to_vec(),
        )
        .ignore()
        .query_async(valkey)
        .await
        .unwrap();
}

/// Stream counts the memory part steps through.
const LEVELS: [usize; 4] = [1_000, 5_000, 10_000, 20_000];
/// Images the memory part's streams watch (each event then reaches about streams / 500).
const MEMORY_IMAGES: usize = 500;

/// How the memory part's streams reach the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Native gRPC, up to 100 streams per HTTP/2 connection.
    Native,
    /// grpc-web over HTTP/1.1: a connection per stream.
    WebHttp1,
    /// grpc-web over HTTP/2, up to 100 streams per connection.
    WebHttp2,
}

/// Memory per stream, each [`Kind`] on a fresh API instance, at each of [`LEVELS`], idle and
/// after traffic.
async fn memory_per_stream(platform: &mut Platform, token: &str) {
    let open_files = open_files_limit();
    println!(
        "memory per stream (API RSS growth / streams open; each kind on a fresh instance; limit on open files {open_files})"
    );
    println!(
        "  {:<10} {:>8} {:>16} {:>20} {:>22}",
        "kind", "streams", "idle KiB/stream", "slope idle KiB/str", "after traffic KiB/str"
    );
    let mut valkey = platform.valkey().await.unwrap();
    for (transport, kind) in [
        (Kind::Native, "native"),
        (Kind::WebHttp1, "web http1"),
        (Kind::WebHttp2, "web http2"),
    ] {
        let url = platform
            .add_api(&[("FOLLOW_MAX_WATCHES_PER_USER", "20000")])
            .await
            .unwrap();
        let pid = *platform.api_pids().last().unwrap();
        let ids = create_images(platform, token, MEMORY_IMAGES).await;
        let (ready, mut live) = tokio::sync::watch::channel(0usize);
        let (delivered, mut got) = tokio::sync::watch::channel(0usize);
        let (ready, delivered) = (Arc::new(ready), Arc::new(delivered));
        // The connection the next streams share (HTTP/2), or none: a connection each.
        let mut shared: Option<Via> = None;
        let mut tasks = Vec::new();
        let base = rss_bytes(pid);
        let mut previous = (0usize, base);
        for (round, &level) in LEVELS.iter().enumerate() {
            // A grpc-web stream is a connection: a socket here and one in the API.
            if transport == Kind::WebHttp1 && level + 1_000 > open_files {
                println!(
                    "  {kind:<10} {level:>8}   not run: {level} connections need more than the {open_files} open files a process may have here"
                );
                break;
            }
            for s in tasks.len()..level {
                if s % 100 == 0 {
                    shared = match transport {
                        Kind::Native => Some(Via::Native(channel(&url).await.unwrap())),
                        Kind::WebHttp2 => {
                            Some(Via::Web(Box::new(follow_e2e::client::grpc_web_h2())))
                        }
                        Kind::WebHttp1 => None,
                    };
                }
                let via = shared
                    .clone()
                    .unwrap_or_else(|| Via::Web(Box::new(follow_e2e::client::grpc_web())));
                let request = bearer(watch_images(&[&ids[s % ids.len()]]), token);
                let url = url.clone();
                let (ready, delivered) = (ready.clone(), delivered.clone());
                tasks.push(tokio::spawn(async move {
                    let mut stream = open_watch(via, &url, request).await;
                    stream.message().await.unwrap().unwrap();
                    ready.send_modify(|n| *n += 1);
                    while let Ok(Some(message)) = stream.message().await {
                        if matches!(message.event, Some(Event::ImageProgress(_))) {
                            delivered.send_modify(|n| *n += 1);
                        }
                    }
                }));
            }
            tokio::time::timeout(Duration::from_secs(180), live.wait_for(|n| *n >= level))
                .await
                .expect("every stream open within 3 minutes")
                .unwrap();
            let idle = rss_bytes(pid);
            let (stage, name) = STAGES[round];
            for id in &ids {
                publish(&mut valkey, platform, id, round, stage, name).await;
            }
            let sent = LEVELS[..round].iter().sum::<usize>() + level;
            tokio::time::timeout(Duration::from_secs(60), got.wait_for(|n| *n >= sent))
                .await
                .expect("every stream has its event within a minute")
                .unwrap();
            let traffic = rss_bytes(pid);
            let kib = |bytes: u64, n: usize| bytes as f64 / n as f64 / 1024.0;
            println!(
                "  {kind:<10} {level:>8} {:>16.1} {:>20.1} {:>22.1}",
                kib(idle.saturating_sub(base), level),
                kib(idle.saturating_sub(previous.1), level - previous.0),
                kib(traffic.saturating_sub(base), level),
            );
            previous = (level, idle);
        }
        for task in tasks {
            task.abort();
        }
    }
    println!("  target: < 20 KB per idle stream, each kind");
}

/// The soft limit on open files of this process (the API's is the same: it inherits it).
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(1024)
}
