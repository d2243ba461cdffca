//! One of follow's own service binaries run as a black box: configured only by environment
//! variables, on a free loopback port, killed with its handle.

use std::{
    path::{Path, PathBuf},
    process::ExitStatus,
    time::Duration,
};

use rustix::process::{Pid, Signal, kill_process};
use tokio::{net::TcpStream, process::Command};

use crate::{
    Home, TestkitError,
    process::{Guarded, spawn_ready, with_free_ports},
};

/// A running service process. Its output goes to a log file in its own temporary directory,
/// quoted by [`ServiceProcess::log`] when a test needs to say why something failed.
#[derive(Debug)]
pub struct ServiceProcess {
    what: &'static str,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    listen_var: &'static str,
    port: u16,
    dir: Home,
    child: Guarded,
}

impl ServiceProcess {
    /// Starts `program args` with `env` plus `listen_var=127.0.0.1:PORT` on a free port, and
    /// waits until the port accepts connections.
    pub async fn start(
        what: &'static str,
        program: &Path,
        args: &[&str],
        env: Vec<(String, String)>,
        listen_var: &'static str,
    ) -> Result<Self, TestkitError> {
        if !program.is_file() {
            return Err(TestkitError::NotFound {
                what,
                hint: "build the workspace's binaries first (`cargo build`; ./dev test does)",
            });
        }
        with_free_ports(what, |[port]| {
            let env = env.clone();
            async move {
                let mut service = Self {
                    what,
                    program: program.to_path_buf(),
                    args: args.iter().map(|a| (*a).to_owned()).collect(),
                    env,
                    listen_var,
                    port,
                    dir: Home::temp("follow-service-")?,
                    child: Guarded::default(),
                };
                service.spawn().await?;
                Ok(service)
            }
        })
        .await
    }

    /// [`ServiceProcess::start`] on a given `port`, its log in `log_dir`.
    pub async fn start_kept(
        what: &'static str,
        program: &Path,
        env: Vec<(String, String)>,
        listen_var: &'static str,
        port: u16,
        log_dir: &Path,
    ) -> Result<Self, TestkitError> {
        let mut service = Self {
            what,
            program: program.to_path_buf(),
            args: Vec::new(),
            env,
            listen_var,
            port,
            dir: Home::kept(log_dir)?,
            child: Guarded::default(),
        };
        service.spawn().await?;
        Ok(service)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Freezes the process (`SIGSTOP`) / lets it go on (`SIGCONT`).
    pub fn pause(&self) {
        self.child.signal(Signal::STOP);
    }

    pub fn resume(&self) {
        self.child.signal(Signal::CONT);
    }

    /// Kills the process with `SIGKILL`, like a crash, and reaps it.
    pub async fn kill(&mut self) {
        self.child.kill().await;
    }

    /// Sends `SIGTERM` and waits for the process to exit (graceful shutdown), up to `within`;
    /// kills it if it has not.
    pub async fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Some(pid) = child.id().and_then(|id| Pid::from_raw(id.cast_signed())) {
            let _ = kill_process(pid, Signal::TERM);
        }
        match tokio::time::timeout(within, child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = child.kill().await;
                None
            }
        }
    }

    /// Sets (`Some`) or removes (`None`) a variable for the next [`ServiceProcess::restart`].
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(value) = value {
            self.env.push((key.to_owned(), value.to_owned()));
        }
    }

    /// Starts the process again on the same port with the same settings (after a kill or a
    /// terminate; a running one is killed first).
    pub async fn restart(&mut self) -> Result<(), TestkitError> {
        self.kill().await;
        self.spawn().await
    }

    /// The last lines the process wrote.
    pub fn log(&self) -> String {
        crate::process::tail(&self.log_path())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.what))
    }

    async fn spawn(&mut self) -> Result<(), TestkitError> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(self.listen_var, format!("127.0.0.1:{}", self.port));
        let port = self.port;
        // Appends, so a restarted process's log follows the previous one's.
        let child = spawn_ready(self.what, command, &self.log_path(), |_| async move {
            TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await?;
        self.child = Guarded::new(child);
        Ok(())
    }
}

impl Drop for ServiceProcess {
    /// A failing test shows what the service was doing: its log dies with its directory.
    fn drop(&mut self) {
        if std::thread::panicking() && !self.dir.is_kept() {
            eprintln!(
                "---- {} on port {}: the last {LOG_LINES_ON_FAILURE} lines of its log ----\n{}",
                self.what,
                self.port,
                crate::process::last_lines(&self.log_path(), LOG_LINES_ON_FAILURE).join("\n")
            );
        }
    }
}

/// How much of a service's log a failing test prints.
const LOG_LINES_ON_FAILURE: usize = 300;
