//! The Valkey users of `follow_bus::acl` on a real server: each service reaches only its own
//! keys and commands, and nobody gets in without a password.
#![allow(clippy::unwrap_used)]

use follow_bus::{acl::User, keys};
use follow_testkit::ValkeyServer;
use redis::aio::MultiplexedConnection;

async fn connect(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
}

/// Runs `args`; the error code if Valkey refused it.
async fn refusal(conn: &mut MultiplexedConnection, args: &[&str]) -> Option<String> {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    match cmd.query_async::<redis::Value>(conn).await {
        Ok(_) => None,
        Err(e) => Some(e.code().unwrap_or("?").to_owned()),
    }
}

/// Both queues' streams and groups, as the services make them.
async fn groups(admin: &mut MultiplexedConnection) {
    for queue in [keys::RESULTS, keys::JOBS] {
        let queue = part(queue);
        let create = [
            "XGROUP",
            "CREATE",
            queue.stream.as_str(),
            queue.group(),
            "0",
            "MKSTREAM",
        ];
        assert_eq!(refusal(admin, &create).await, None);
    }
}

/// A queue's keys on one partition (any: the rules are the same on all).
fn part(queue: keys::Queue) -> keys::QueuePartition {
    queue.at(keys::Partitions::DEFAULT.get(3).unwrap())
}

fn noperm() -> Option<String> {
    Some("NOPERM".to_owned())
}

#[tokio::test]
async fn the_gateway_cannot_read_results_flush_or_reconfigure() {
    let (results, jobs) = (part(keys::RESULTS), part(keys::JOBS));
    let server = ValkeyServer::start().await.unwrap();
    let mut admin = server.connection().await;
    groups(&mut admin).await;
    let mut gateway = connect(&server.url_as(User::Gateway)).await.unwrap();
    // What it needs: add results, read its own jobs.
    assert_eq!(
        refusal(
            &mut gateway,
            &["XADD", results.stream.as_str(), "*", "f", "v"]
        )
        .await,
        None
    );
    let read_jobs = [
        "XREADGROUP",
        "GROUP",
        keys::JOBS.group,
        "g-1",
        "COUNT",
        "1",
        "STREAMS",
        jobs.stream.as_str(),
        ">",
    ];
    assert_eq!(refusal(&mut gateway, &read_jobs).await, None);
    // What it must not do.
    let read_results = [
        "XREADGROUP",
        "GROUP",
        keys::RESULTS.group,
        "g-1",
        "COUNT",
        "1",
        "STREAMS",
        results.stream.as_str(),
        ">",
    ];
    for forbidden in [
        &read_results[..],
        &["XRANGE", results.stream.as_str(), "-", "+"],
        &["XRANGE", results.dead.as_str(), "-", "+"],
        &["GET", &keys::rate_limit("upload-tokens", "alice")],
        &["FLUSHALL"],
        &["FLUSHDB"],
        &["KEYS", "*"],
        &["CONFIG", "SET", "appendonly", "no"],
        &["CLIENT", "KILL", "ID", "1"],
        &["ACL", "LIST"],
        &["SET", "elsewhere", "1"],
    ] {
        assert_eq!(
            refusal(&mut gateway, forbidden).await,
            noperm(),
            "{forbidden:?}"
        );
    }
    // Nor through a script (refused inside it: an `ERR` naming the ACL).
    let script = ["EVAL", "return redis.call('FLUSHALL')", "0"];
    assert!(refusal(&mut gateway, &script).await.is_some());
    let len: usize = redis::cmd("XLEN")
        .arg(results.stream.as_str())
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(len, 1, "the result the gateway added is still there");
}

#[tokio::test]
async fn the_api_cannot_take_jobs_or_flush() {
    let jobs = part(keys::JOBS);
    let server = ValkeyServer::start().await.unwrap();
    let mut admin = server.connection().await;
    refusal(
        &mut admin,
        &[
            "XGROUP",
            "CREATE",
            jobs.stream.as_str(),
            keys::JOBS.group,
            "0",
            "MKSTREAM",
        ],
    )
    .await;
    let mut api = connect(&server.url_as(User::Api)).await.unwrap();
    assert_eq!(
        refusal(&mut api, &["XADD", jobs.stream.as_str(), "*", "f", "v"]).await,
        None,
        "the reconciler queues jobs"
    );
    let take_jobs = [
        "XREADGROUP",
        "GROUP",
        keys::JOBS.group,
        "a-1",
        "COUNT",
        "1",
        "STREAMS",
        jobs.stream.as_str(),
        ">",
    ];
    for forbidden in [
        &take_jobs[..],
        &["XRANGE", jobs.dead.as_str(), "-", "+"],
        &["FLUSHALL"],
        &["SHUTDOWN"],
        &["SET", "elsewhere", "1"],
    ] {
        assert_eq!(
            refusal(&mut api, forbidden).await,
            noperm(),
            "{forbidden:?}"
        );
    }
}

#[tokio::test]
async fn nobody_gets_in_without_the_password() {
    let server = ValkeyServer::start().await.unwrap();
    let anonymous = format!("redis://127.0.0.1:{}", server.port());
    match connect(&anonymous).await {
        Err(e) => assert_eq!(e.code(), Some("NOAUTH"), "{e}"),
        Ok(mut conn) => {
            assert_eq!(
                refusal(&mut conn, &["GET", "x"]).await,
                Some("NOAUTH".into())
            );
        }
    }
    for user in User::ALL {
        let wrong = format!(
            "redis://{}:not-the-password@127.0.0.1:{}",
            user.name(),
            server.port()
        );
        let refused = connect(&wrong).await.err().unwrap();
        assert_eq!(
            refused.kind(),
            redis::ErrorKind::AuthenticationFailed,
            "{refused}"
        );
    }
}

/// Each service may `XADD` to the other's stream and nothing else: one leaked password must not
/// wipe, trim, acknowledge, claim or read the other service's unapplied work.
#[tokio::test]
async fn neither_service_can_do_more_than_add_to_the_others_stream() {
    let server = ValkeyServer::start().await.unwrap();
    let mut admin = server.connection().await;
    groups(&mut admin).await;
    for (user, theirs) in [(User::Gateway, keys::RESULTS), (User::Api, keys::JOBS)] {
        let theirs = part(theirs);
        let mut conn = connect(&server.url_as(user)).await.unwrap();
        let added: String = redis::cmd("XADD")
            .arg(&theirs.stream)
            .arg("*")
            .arg("f")
            .arg("v")
            .query_async(&mut conn)
            .await
            .unwrap();
        let (stream, group, dead, failures) = (
            theirs.stream.as_str(),
            theirs.group(),
            theirs.dead.as_str(),
            theirs.failures.as_str(),
        );
        let forbidden: Vec<Vec<&str>> = vec![
            vec!["DEL", stream],
            vec!["UNLINK", stream],
            vec!["XTRIM", stream, "MAXLEN", "0"],
            vec!["XTRIM", stream, "MINID", "+"],
            vec!["XDEL", stream, &added],
            vec!["XACK", stream, group, &added],
            vec!["XCLAIM", stream, group, "thief", "0", &added],
            vec!["XAUTOCLAIM", stream, group, "thief", "0", "0"],
            vec![
                "XREADGROUP",
                "GROUP",
                group,
                "thief",
                "STREAMS",
                stream,
                ">",
            ],
            vec!["XREAD", "STREAMS", stream, "0"],
            vec!["XRANGE", stream, "-", "+"],
            vec!["XPENDING", stream, group],
            vec!["XINFO", "GROUPS", stream],
            vec!["XGROUP", "DESTROY", stream, group],
            vec!["XGROUP", "SETID", stream, group, "$"],
            vec!["XGROUP", "CREATE", stream, "mine", "0"],
            vec!["XGROUP", "DELCONSUMER", stream, group, "c"],
            vec!["XSETID", stream, "999999999999-0"],
            vec!["EXPIRE", stream, "1"],
            vec!["RENAME", stream, "elsewhere"],
            vec!["SET", stream, "x"],
            vec!["XADD", dead, "*", "f", "v"],
            vec!["XRANGE", dead, "-", "+"],
            vec!["DEL", dead],
            vec!["HSET", failures, "1-1", "99"],
            vec!["DEL", failures],
        ];
        for command in &forbidden {
            assert!(
                refusal(&mut conn, command).await.is_some(),
                "{user:?} may run {command:?}"
            );
        }
        // Nor through a script.
        let script = ["EVAL", "return redis.call('DEL', KEYS[1])", "1", stream];
        assert!(refusal(&mut conn, &script).await.is_some(), "{user:?}");
        let len: usize = redis::cmd("XLEN")
            .arg(stream)
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(len, 1, "{user:?}: the entry it added is all that changed");
    }
}
