//! `follow-image-gateway`: the image gateway binary (settings: `FOLLOW_*`, see
//! `follow_image_gateway::config`). SIGINT / SIGTERM stop it gracefully.
#![forbid(unsafe_code)]

use follow_service::config::FromEnv as _;
use std::process::ExitCode;

use anyhow::Context as _;
use follow_image_gateway::{app::Application, config::Config};
use tokio::net::TcpListener;

fn main() -> ExitCode {
    // Reads FAILPOINTS when built with the `failpoints` feature; nothing otherwise.
    let _failpoints = fail::FailScenario::setup();
    follow_service::runtime::main("follow-image-gateway", || async {
        let config = Config::from_env()?;
        tracing::info!(?config, "starting");
        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("binding {}", config.server.listen))?;
        let application = Application::build(config, listener)?;
        let cancel = follow_service::runtime::shutdown_token();
        application.run(cancel).await?;
        anyhow::Ok(())
    })
}
