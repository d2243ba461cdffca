//! Logging: JSON lines on stderr (`FOLLOW_LOG_FORMAT=text` for humans), filtered by `FOLLOW_LOG`
//! (default `info`; any `tracing` filter, e.g. `follow_api=debug,info`).

/// Installs the global subscriber; a second call does nothing.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FOLLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = if std::env::var("FOLLOW_LOG_FORMAT").is_ok_and(|f| f == "text") {
        builder.try_init()
    } else {
        builder.json().with_current_span(true).try_init()
    };
    drop(installed);
}
