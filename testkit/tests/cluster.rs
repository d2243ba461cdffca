//! The test kit's cluster forms, serves every slot through a cluster client, and moves slots.

use follow_testkit::{ValkeyCluster, ValkeyUser};
use redis::AsyncCommands;

#[tokio::test]
async fn a_cluster_forms_serves_every_shard_and_migrates_slots() {
    let cluster = ValkeyCluster::start().await.unwrap();
    let mut conn = cluster.connection().await;
    for key in ["a", "b", "c", "{p1}x", "{p2}y"] {
        let _: () = conn.set(key, key).await.unwrap();
        let value: String = conn.get(key).await.unwrap();
        assert_eq!(value, key);
    }
    let mut owners = Vec::new();
    for key in ["a", "b", "c"] {
        owners.push(cluster.primary_for(key).await.unwrap());
    }
    owners.sort_unstable();
    owners.dedup();
    assert!(owners.len() > 1, "keys spread over primaries: {owners:?}");
    assert!(cluster.urls_as(ValkeyUser::Api).split(',').count() == 6);

    let before = cluster.primary_for("{p1}x").await.unwrap();
    let to = (0..3).find(|&i| i != before).unwrap();
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg("{p1}x")
        .query_async(&mut cluster.node(0).connection().await)
        .await
        .unwrap();
    cluster.migrate_slots(slot, slot, to).await.unwrap();
    assert_eq!(cluster.primary_for("{p1}x").await.unwrap(), to);
    let value: String = conn.get("{p1}x").await.unwrap();
    assert_eq!(value, "{p1}x");
}
