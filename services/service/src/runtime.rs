//! What a service binary's `main` does around its own work: logging, the tokio runtime, the
//! exit code, and the one cancellation token that SIGINT / SIGTERM fire.

use std::{fmt, future::Future, process::ExitCode};

use tokio_util::sync::CancellationToken;

/// Runs `work` on a multi-threaded runtime with logging set up; a failure is logged and printed
/// (with its causes) and makes the exit code non-zero.
pub fn main<F, E>(name: &'static str, work: impl FnOnce() -> F) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: fmt::Display,
{
    crate::logging::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{name} failed");
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A token cancelled on the first SIGINT or SIGTERM: the start of a graceful shutdown.
pub fn shutdown_token() -> CancellationToken {
    let cancel = CancellationToken::new();
    tokio::spawn(cancel_on_signal(cancel.clone()));
    cancel
}

async fn cancel_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
        () = cancel.cancelled() => return,
    }
    tracing::info!("shutdown requested");
    cancel.cancel();
}
