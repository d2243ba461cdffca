//! The result stream against a real Valkey: producer, consumer group, pending re-read, reclaim,
//! dead-lettering, trimming and recovery from lost data.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::{collections::HashMap, time::Duration};

use common::*;
use follow_bus::{
    Consumer, Delivery, EntryId, HealthChecker, ImageResult, Outcome, Producer, StreamMessage,
    Trimmer, keys,
};
use follow_testkit::eventually_async;
use uuid::Uuid;

#[tokio::test]
async fn produced_fields_are_readable_strings() {
    let (server, valkey) = valkey().await;
    let mut producer = Producer::new(&valkey).unwrap();
    let result = processed(Uuid::new_v4());
    let id = producer.publish(&result).await.unwrap();

    let mut conn = server.connection().await;
    let entries = xrange(&mut conn, "image:result:{p0}").await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, id.0);
    let fields: HashMap<_, _> = entries[0].1.iter().cloned().collect();
    assert_eq!(fields["image_id"], result.image_id.to_string());
    assert_eq!(fields["status"], "processed");
    assert_eq!(fields["schema_version"], "1");
    assert_eq!(fields["processed_width"], "2048");
    assert!(fields["produced_at"].ends_with('Z'));
    assert_eq!(ImageResult::from_fields(&entries[0].1).unwrap(), result);
}

#[tokio::test]
async fn each_result_goes_to_exactly_one_of_several_consumers() {
    let (server, valkey) = valkey().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut consumers = Vec::new();
    for name in ["c1", "c2", "c3"] {
        let consumer = Consumer::new(
            &valkey,
            follow_bus::ConsumerConfig {
                batch_size: 4,
                ..config(name)
            },
        )
        .unwrap();
        let handler = Recorder {
            name: name.into(),
            tx: tx.clone(),
            decide: |_: &Delivery<ImageResult>| Outcome::Ack,
        };
        consumers.push(spawn(consumer, handler));
    }
    let mut producer = Producer::new(&valkey).unwrap();
    let mut sent = Vec::new();
    for _ in 0..60 {
        let r = processed(Uuid::new_v4());
        sent.push(r.image_id);
        producer.publish(&r).await.unwrap();
    }
    let mut seen: HashMap<Uuid, Vec<String>> = HashMap::new();
    for _ in 0..sent.len() {
        let (who, d) = recv(&mut rx).await;
        seen.entry(d.message.image_id).or_default().push(who);
    }
    for id in &sent {
        assert_eq!(seen[id].len(), 1, "{id} handled by {:?}", seen[id]);
    }
    let mut conn = server.connection().await;
    drained(&conn).await;
    for running in consumers {
        running.stop().await;
    }
    assert!(rx.try_recv().is_err(), "no result was handled twice");
    assert_eq!(pending(&mut conn, "api-workers").await, 0);
}

#[tokio::test]
async fn a_restarted_consumer_re_reads_its_own_pending_entries_first() {
    let (server, valkey) = valkey().await;
    let mut producer = Producer::new(&valkey).unwrap();
    let result = processed(Uuid::new_v4());
    producer.publish(&result).await.unwrap();

    // First life: the handler never finishes applying (Retry), and the process is stopped.
    let consumer = Consumer::new(&valkey, config("api-1")).unwrap();
    let (handler, mut rx) = recorder_with("first", |_: &Delivery<ImageResult>| Outcome::Retry);
    let running = spawn(consumer, handler);
    let (_, first) = recv(&mut rx).await;
    assert_eq!(first.deliveries, 1);
    running.stop().await;
    let mut conn = server.connection().await;
    assert_eq!(
        pending(&mut conn, "api-workers").await,
        1,
        "not acknowledged, not lost"
    );

    // Second life, same consumer name, long min_idle so no reclaim is involved.
    let consumer = Consumer::new(
        &valkey,
        follow_bus::ConsumerConfig {
            min_idle: Duration::from_secs(3600),
            ..config("api-1")
        },
    )
    .unwrap();
    let (handler, mut rx) = recorder("second");
    let running = spawn(consumer, handler);
    let (_, again) = recv(&mut rx).await;
    assert_eq!(again.message, result);
    assert_eq!(again.id, first.id);
    assert_eq!(again.deliveries, 2);
    drained(&conn).await;
    running.stop().await;
}

#[tokio::test]
async fn retry_keeps_the_entry_without_redelivery_or_dead_lettering() {
    let (server, valkey) = valkey().await;
    Producer::new(&valkey)
        .unwrap()
        .publish(&processed(Uuid::new_v4()))
        .await
        .unwrap();
    // A database outage lasting longer than max_deliveries attempts.
    let consumer = Consumer::new(
        &valkey,
        follow_bus::ConsumerConfig {
            max_deliveries: 1,
            min_idle: Duration::from_millis(20),
            ..config("api-1")
        },
    )
    .unwrap();
    let stats = consumer.stats();
    let mut calls = 0;
    let (handler, mut rx) = recorder_with("h", move |_: &Delivery<ImageResult>| {
        calls += 1;
        if calls <= 5 {
            Outcome::Retry
        } else {
            Outcome::Ack
        }
    });
    let running = spawn(consumer, handler);
    for _ in 0..6 {
        let (_, d) = recv(&mut rx).await;
        assert_eq!(
            d.deliveries, 1,
            "retries happen in memory, not by redelivery"
        );
    }
    let mut conn = server.connection().await;
    drained(&conn).await;
    running.stop().await;
    assert_eq!(xlen(&mut conn, "image:result:dead:{p0}").await, 0);
    assert_eq!(stats.retried.load(std::sync::atomic::Ordering::Relaxed), 5);
}

#[tokio::test]
async fn an_idle_entry_of_a_dead_consumer_is_reclaimed_by_another() {
    let (server, valkey) = valkey().await;
    let mut conn = server.connection().await;
    create_group(&mut conn).await;
    let result = processed(Uuid::new_v4());
    Producer::new(&valkey)
        .unwrap()
        .publish(&result)
        .await
        .unwrap();
    let ids = read_raw(&mut conn, "crashed", 10).await;
    assert_eq!(ids.len(), 1);

    let consumer = Consumer::new(
        &valkey,
        follow_bus::ConsumerConfig {
            min_idle: Duration::from_millis(100),
            ..config("survivor")
        },
    )
    .unwrap();
    let stats = consumer.stats();
    let (handler, mut rx) = recorder("survivor");
    let running = spawn(consumer, handler);
    let (_, d) = recv(&mut rx).await;
    assert_eq!(d.id, EntryId(ids[0].clone()));
    assert_eq!(d.message, result);
    assert_eq!(d.deliveries, 2);
    drained(&conn).await;
    running.stop().await;
    assert_eq!(
        stats.reclaimed.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn an_entry_delivered_too_often_is_dead_lettered_with_its_reason() {
    let (server, valkey) = valkey().await;
    let mut conn = server.connection().await;
    create_group(&mut conn).await;
    let result = failed(Uuid::new_v4());
    let id = Producer::new(&valkey)
        .unwrap()
        .publish(&result)
        .await
        .unwrap();
    // Delivered 4 times in all to consumers that died with it: a crash loop.
    read_raw(&mut conn, "crashing", 1).await;
    redeliver(&mut conn, "crashing", &id.0, 3).await;

    let consumer = Consumer::new(
        &valkey,
        follow_bus::ConsumerConfig {
            min_idle: Duration::ZERO,
            max_deliveries: 4,
            ..config("survivor")
        },
    )
    .unwrap();
    let stats = consumer.stats();
    let (handler, mut rx) = recorder("survivor");
    let running = spawn(consumer, handler);
    eventually_async(WITHIN, "the entry dead-lettered", || {
        let mut conn = conn.clone();
        async move { (xlen(&mut conn, "image:result:dead:{p0}").await == 1).then_some(()) }
    })
    .await;
    drained(&conn).await;
    running.stop().await;
    assert!(
        rx.try_recv().is_err(),
        "the 5th delivery is over the limit of 4"
    );
    assert_eq!(
        stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let dead = xrange(&mut conn, "image:result:dead:{p0}").await;
    let fields: HashMap<_, _> = dead[0].1.iter().cloned().collect();
    assert_eq!(fields["dead_original_id"], id.0);
    assert_eq!(fields["dead_deliveries"], "5");
    assert!(
        fields["dead_reason"].contains("delivered 5 times"),
        "{}",
        fields["dead_reason"]
    );
    assert_eq!(fields["dead_consumer"], "survivor");
    // The original result is kept whole.
    assert_eq!(ImageResult::from_fields(&dead[0].1).unwrap(), result);
}

#[tokio::test]
async fn restarts_are_not_failures_but_a_handler_failing_n_times_dead_letters() {
    let (server, valkey) = valkey().await;
    let mut conn = server.connection().await;
    create_group(&mut conn).await;
    let (fine, poison) = (processed(Uuid::new_v4()), processed(Uuid::new_v4()));
    let mut producer = Producer::new(&valkey).unwrap();
    producer.publish(&fine).await.unwrap();
    let poison_id = producer.publish(&poison).await.unwrap();
    // Ten lives of "api-1", each reading both and dying before the ack: restarts, not failures.
    read_raw(&mut conn, "api-1", 2).await;
    for _ in 0..9 {
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("api-workers")
            .arg("api-1")
            .arg("STREAMS")
            .arg("image:result:{p0}")
            .arg("0")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let consumer = Consumer::new(
        &valkey,
        follow_bus::ConsumerConfig {
            max_failures: 3,
            ..config("api-1")
        },
    )
    .unwrap();
    let bad = poison.image_id;
    let (handler, mut rx) = recorder_with("h", move |d: &Delivery<ImageResult>| {
        if d.message.image_id == bad {
            Outcome::Fail("the database refuses it".into())
        } else {
            Outcome::Ack
        }
    });
    let running = spawn(consumer, handler);
    eventually_async(WITHIN, "the poison dead-lettered", || {
        let mut conn = conn.clone();
        async move { (xlen(&mut conn, "image:result:dead:{p0}").await == 1).then_some(()) }
    })
    .await;
    drained(&conn).await;
    running.stop().await;
    let mut seen = Vec::new();
    while let Ok((_, d)) = rx.try_recv() {
        seen.push((d.message.image_id, d.failures));
    }
    assert_eq!(
        seen,
        [(fine.image_id, 0), (bad, 0), (bad, 1), (bad, 2)],
        "the fine one applied after ten restarts; the poison handed three times"
    );
    let dead = xrange(&mut conn, "image:result:dead:{p0}").await;
    let fields: HashMap<_, _> = dead[0].1.iter().cloned().collect();
    assert_eq!(fields["dead_original_id"], poison_id.0);
    assert_eq!(fields["dead_failures"], "3");
    assert!(
        fields["dead_reason"].contains("failed 3 times"),
        "{}",
        fields["dead_reason"]
    );
    let counts: u64 = redis::cmd("HLEN")
        .arg("image:result:failures:{p0}")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(counts, 0, "no failure count outlives its entry");
}

#[tokio::test]
async fn poison_and_handler_refusals_go_to_the_dead_stream_and_the_rest_is_applied() {
    let (server, valkey) = valkey().await;
    let mut conn = server.connection().await;
    // Poison: a required field missing, and a binary field name.
    redis::cmd("XADD")
        .arg("image:result:{p0}")
        .arg("*")
        .arg("image_id")
        .arg(Uuid::new_v4().to_string())
        .arg("status")
        .arg("processed")
        .query_async::<String>(&mut conn)
        .await
        .unwrap();
    redis::cmd("XADD")
        .arg("image:result:{p0}")
        .arg("*")
        .arg(&[0xffu8, 0xfe][..])
        .arg(&[0x80u8][..])
        .query_async::<String>(&mut conn)
        .await
        .unwrap();
    let refused = processed(Uuid::new_v4());
    let good = processed(Uuid::new_v4());
    let mut producer = Producer::new(&valkey).unwrap();
    producer.publish(&refused).await.unwrap();
    producer.publish(&good).await.unwrap();

    let consumer = Consumer::new(&valkey, config("api-1")).unwrap();
    let refused_id = refused.image_id;
    let (handler, mut rx) = recorder_with("h", move |d: &Delivery<ImageResult>| {
        if d.message.image_id == refused_id {
            Outcome::dead_letter("route was deleted")
        } else {
            Outcome::Ack
        }
    });
    let running = spawn(consumer, handler);
    let handled = [
        recv(&mut rx).await.1.message.image_id,
        recv(&mut rx).await.1.message.image_id,
    ];
    assert_eq!(
        handled,
        [refused.image_id, good.image_id],
        "the handler never sees poison"
    );
    eventually_async(WITHIN, "three entries dead-lettered", || {
        let mut conn = conn.clone();
        async move { (xlen(&mut conn, "image:result:dead:{p0}").await == 3).then_some(()) }
    })
    .await;
    drained(&conn).await;
    running.stop().await;
    let reasons: RawEntries = redis::cmd("XRANGE")
        .arg("image:result:dead:{p0}")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let reasons: Vec<String> = reasons
        .iter()
        .map(|(_, f)| {
            let (_, v) = f.iter().find(|(k, _)| k == b"dead_reason").unwrap();
            String::from_utf8(v.clone()).unwrap()
        })
        .collect();
    assert!(
        reasons[0].starts_with("poison: missing required field"),
        "{reasons:?}"
    );
    assert!(reasons[1].starts_with("poison:"), "{reasons:?}");
    assert_eq!(reasons[2], "route was deleted");
}

#[tokio::test]
async fn trimming_never_drops_an_unacknowledged_entry() {
    let (server, valkey) = valkey().await;
    let mut conn = server.connection().await;
    let mut trimmer = Trimmer::new(&valkey, keys::RESULTS).unwrap();
    let mut producer = Producer::new(&valkey).unwrap();
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(
            producer
                .publish(&processed(Uuid::new_v4()))
                .await
                .unwrap()
                .0,
        );
    }
    assert_eq!(
        trimmer.trim().await.unwrap(),
        0,
        "without the group nothing is trimmed"
    );

    create_group(&mut conn).await;
    assert_eq!(trimmer.trim().await.unwrap(), 0, "nothing delivered yet");
    assert_eq!(read_raw(&mut conn, "c", 4).await, ids[..4]);
    let acker = conn.clone();
    let ack = |id: &str| {
        let mut conn = acker.clone();
        let id = id.to_owned();
        async move {
            redis::cmd("XACK")
                .arg("image:result:{p0}")
                .arg("api-workers")
                .arg(id)
                .query_async::<u64>(&mut conn)
                .await
                .unwrap()
        }
    };
    ack(&ids[0]).await;
    ack(&ids[1]).await;
    ack(&ids[3]).await;
    // ids[2] is pending: it and everything after it must stay.
    assert_eq!(trimmer.trim().await.unwrap(), 2);
    let first: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("image:result:{p0}")
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(first[0].0, ids[2]);
    assert_eq!(xlen(&mut conn, "image:result:{p0}").await, 8);

    ack(&ids[2]).await;
    // Now ids[2] and ids[3] are acknowledged; 4.. were never delivered.
    assert_eq!(trimmer.trim().await.unwrap(), 2);
    assert_eq!(xlen(&mut conn, "image:result:{p0}").await, 6);
    assert_eq!(trimmer.trim().await.unwrap(), 0);
}

#[tokio::test]
async fn the_consumer_recreates_its_group_after_valkey_loses_its_data() {
    let (server, valkey) = valkey().await;
    let consumer = Consumer::new(&valkey, config("api-1")).unwrap();
    let (handler, mut rx) = recorder("h");
    let running = spawn(consumer, handler);
    let mut producer = Producer::new(&valkey).unwrap();
    let before = processed(Uuid::new_v4());
    producer.publish(&before).await.unwrap();
    assert_eq!(recv(&mut rx).await.1.message, before);

    let mut conn = server.connection().await;
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let after = processed(Uuid::new_v4());
    producer.publish(&after).await.unwrap();
    assert_eq!(recv(&mut rx).await.1.message, after);

    let mut health = HealthChecker::new(&valkey, Some(keys::RESULTS)).unwrap();
    assert_eq!(health.check().await.group, Some(true), "group is back");
    running.stop().await;
}

#[tokio::test]
async fn the_consumer_survives_a_valkey_restart_and_stops_promptly() {
    let (mut server, valkey) = valkey().await;
    let consumer = Consumer::new(&valkey, config("api-1")).unwrap();
    let (handler, mut rx) = recorder("h");
    let running = spawn(consumer, handler);
    server.restart().await.unwrap();
    let producer = Producer::new(&valkey).unwrap();
    let r = processed(Uuid::new_v4());
    // The producer's lazy connection may still be reconnecting: retry the publish until it goes.
    eventually_async(WITHIN, "publish after restart", || {
        let mut producer = producer.clone();
        let r = r.clone();
        async move { producer.publish(&r).await.ok() }
    })
    .await;
    assert_eq!(recv(&mut rx).await.1.message, r);

    server.stop().await;
    running.stop().await;
}

#[tokio::test]
async fn health_reports_valkey_and_the_group() {
    let (mut server, valkey) = valkey().await;
    let mut health = HealthChecker::new(&valkey, Some(keys::RESULTS)).unwrap();
    let h = health.check().await;
    assert!(h.valkey);
    assert_eq!(h.group, Some(false));
    let mut conn = server.connection().await;
    create_group(&mut conn).await;
    assert_eq!(health.check().await.group, Some(true));
    let mut gateway = HealthChecker::new(&valkey, None).unwrap();
    assert_eq!(gateway.check().await.group, None);

    server.stop().await;
    let down = health.check().await;
    assert!(!down.valkey);
    assert_eq!(down.group, None);
}

#[tokio::test]
async fn a_crash_looping_entry_in_our_own_pending_list_is_dead_lettered_on_re_read() {
    let (server, valkey) = valkey().await;
    let mut conn = server.connection().await;
    create_group(&mut conn).await;
    let poison_pill = processed(Uuid::new_v4());
    let fine = processed(Uuid::new_v4());
    let mut producer = Producer::new(&valkey).unwrap();
    let id = producer.publish(&poison_pill).await.unwrap();
    // Three lives of "api-1" each read it and crashed before the ack.
    read_raw(&mut conn, "api-1", 1).await;
    redeliver(&mut conn, "api-1", &id.0, 2).await;
    producer.publish(&fine).await.unwrap();

    let consumer = Consumer::new(
        &valkey,
        follow_bus::ConsumerConfig {
            max_deliveries: 3,
            min_idle: Duration::from_secs(3600),
            ..config("api-1")
        },
    )
    .unwrap();
    let stats = consumer.stats();
    let (handler, mut rx) = recorder("h");
    let running = spawn(consumer, handler);
    // The fourth life hands the handler only the other result.
    assert_eq!(recv(&mut rx).await.1.message, fine);
    drained(&conn).await;
    running.stop().await;
    assert!(rx.try_recv().is_err());
    let dead = xrange(&mut conn, "image:result:dead:{p0}").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0]
            .1
            .iter()
            .find(|(k, _)| k == "dead_original_id")
            .unwrap()
            .1,
        id.0
    );
    assert_eq!(
        stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}
