//! Spawning a server process and waiting until it is ready, shared by every server here.

use std::{future::Future, path::Path, process::Stdio, time::Duration};

use tokio::{
    process::{Child, Command},
    time::{Instant, sleep},
};

use crate::TestkitError;

const READY_WITHIN: Duration = Duration::from_secs(30);

/// Starts `command` (killed when its handle drops) and polls `ready` until it says yes.
/// Fails if the process exits first or the deadline passes; `log` is quoted in the error.
pub(crate) async fn spawn_ready<F, Fut>(
    what: &'static str,
    mut command: Command,
    log: &Path,
    mut ready: F,
) -> Result<Child, TestkitError>
where
    F: FnMut(Option<u32>) -> Fut,
    Fut: Future<Output = bool>,
{
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()?;
    let until = Instant::now() + READY_WITHIN;
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(TestkitError::NotReady {
                what,
                detail: format!("exited with {status}: {}", tail(log)),
            });
        }
        if ready(child.id()).await {
            return Ok(child);
        }
        if Instant::now() >= until {
            let _ = child.kill().await;
            return Err(TestkitError::NotReady {
                what,
                detail: format!("not ready within {READY_WITHIN:?}: {}", tail(log)),
            });
        }
        sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `attempt` with fresh free ports until one start succeeds: another test can take a port
/// between our probe and the server's bind.
pub(crate) async fn with_free_ports<const N: usize, T, F, Fut>(
    what: &'static str,
    mut attempt: F,
) -> Result<T, TestkitError>
where
    F: FnMut([u16; N]) -> Fut,
    Fut: Future<Output = Result<T, TestkitError>>,
{
    let mut last = String::new();
    for _ in 0..5 {
        let mut ports = [0; N];
        for p in &mut ports {
            *p = crate::free_port()?;
        }
        match attempt(ports).await {
            Ok(server) => return Ok(server),
            Err(e) => last = e.to_string(),
        }
    }
    Err(TestkitError::NotReady { what, detail: last })
}

/// Runs a short command to completion, failing with its output when it fails.
pub(crate) async fn run(what: &'static str, command: &mut Command) -> Result<String, TestkitError> {
    let out = command.stdin(Stdio::null()).output().await?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(TestkitError::NotReady {
            what,
            detail: format!(
                "{:?} exited with {}: {}{}",
                command.as_std().get_program(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

/// The last 20 lines of `log` on one line, for an error message.
pub(crate) fn tail(log: &Path) -> String {
    last_lines(log, 20).join(" | ")
}

/// The last `n` lines of `log`.
pub(crate) fn last_lines(log: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| (*l).to_owned())
        .collect()
}

/// A server process that dies with its handle (even when a test panics).
#[derive(Debug, Default)]
pub(crate) struct Guarded(Option<Child>);

impl Guarded {
    pub(crate) fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// The process, for a caller that stops it its own way.
    pub(crate) fn take(&mut self) -> Option<Child> {
        self.0.take()
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.0.as_ref().and_then(Child::id)
    }

    pub(crate) fn is_running(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Sends `signal` (e.g. `STOP` to freeze it: its sockets stay open but nothing answers,
    /// `CONT` to let it go on). A `STOP` returns once every thread of the process has stopped
    /// (within 10 s): it is delivered asynchronously, and on a loaded machine a "frozen" server
    /// could otherwise still answer the test's first request.
    pub(crate) fn signal(&self, signal: rustix::process::Signal) {
        let Some(id) = self.pid() else { return };
        if let Some(pid) = rustix::process::Pid::from_raw(id.cast_signed()) {
            let _ = rustix::process::kill_process(pid, signal);
        }
        if signal == rustix::process::Signal::STOP {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !all_threads_stopped(id) && std::time::Instant::now() < deadline {
                std::thread::yield_now();
            }
        }
    }

    /// Asks the process to stop (`SIGTERM`) and waits for it (a minute at most, then kills it).
    pub(crate) async fn terminate(&mut self) {
        self.signal(rustix::process::Signal::TERM);
        if let Some(mut child) = self.0.take()
            && tokio::time::timeout(Duration::from_secs(60), child.wait())
                .await
                .is_err()
        {
            let _ = child.kill().await;
        }
    }

    /// Kills the process (`SIGKILL`, like a crash) and reaps it.
    pub(crate) async fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill().await;
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// Whether every thread of process `pid` is stopped (`T` in `/proc/{pid}/task/*/stat`); a
/// process that is gone counts as stopped.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).map_or(true, |stat| {
            // The state follows the command name, which ends at the last `)`.
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
        })
    })
}
