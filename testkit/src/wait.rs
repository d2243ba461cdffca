use std::{future::Future, time::Duration};

use tokio::time::{Instant, sleep};

const POLL: Duration = Duration::from_millis(10);

/// Polls `check` until it returns `Some`, or panics with `what` after `deadline`.
/// For tests: waiting on a condition with a deadline, never sleeping a guessed time.
pub async fn eventually<T>(
    deadline: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    eventually_async(deadline, what, || std::future::ready(check())).await
}

/// [`eventually`] with an async check.
pub async fn eventually_async<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        sleep(POLL).await;
    }
}

/// How a gRPC response stream ends: its error status, within `deadline` (messages before it
/// are skipped). Panics if it ends cleanly or not in time.
pub async fn stream_end<T>(stream: &mut tonic::Streaming<T>, deadline: Duration) -> tonic::Status {
    let end = async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended without an error"),
                Err(status) => return status,
            }
        }
    };
    tokio::time::timeout(deadline, end)
        .await
        .unwrap_or_else(|_| panic!("the stream did not end within {deadline:?}"))
}
