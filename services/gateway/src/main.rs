//! `follow-image-gateway`: the image gateway binary (settings: `FOLLOW_*`, see
//! `follow_image_gateway::config`). SIGINT / SIGTERM stop it gracefully.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context as _;
use follow_image_gateway::{app::Application, config::Config};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("follow-image-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "follow-image-gateway failed");
            eprintln!("follow-image-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    tracing::info!(?config, "starting");
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let application = Application::build(config, listener)?;
    let cancel = CancellationToken::new();
    let signals = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let term = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = term => {}
            }
            tracing::info!("shutdown requested");
            cancel.cancel();
        }
    });
    let result = application.run(cancel).await;
    signals.abort();
    Ok(result?)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FOLLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("FOLLOW_LOG_FORMAT").is_ok_and(|f| f == "text") {
        builder.init();
    } else {
        builder.json().with_current_span(true).init();
    }
}
