use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::{
    Home, TestkitError,
    process::{Guarded, run, spawn_ready, with_free_ports},
};

/// The database every [`PostgresServer`] has, owned by its superuser `follow`.
pub(crate) const DATABASE: &str = "follow";
/// The role a service runs as ([`PostgresServer::service_url`]): made, with its rights, by the
/// service's own migration step, to which [`PostgresServer::service_password`] is given.
pub(crate) const SERVICE_ROLE: &str = "follow_api";

/// A PostgreSQL server of one test: a fresh cluster (superuser `follow` with a random password,
/// SCRAM-SHA-256 authentication only, TCP on loopback only, durability off for speed) with an
/// empty database [`DATABASE`]. Killed when dropped.
///
/// PostgreSQL refuses to run as root; as root the cluster is made and run as the `postgres`
/// user (through `setpriv`, which `./dev` relies on too).
#[derive(Debug)]
pub struct PostgresServer {
    bin: PathBuf,
    dir: Home,
    port: u16,
    password: String,
    /// `fsync` and friends on (kept clusters, benchmarks) or off (tests, for speed).
    durable: bool,
    child: Guarded,
}

/// The superuser's password, kept in the cluster's directory (mode 0600).
const PASSWORD_FILE: &str = "password";

impl PostgresServer {
    pub async fn start() -> Result<Self, TestkitError> {
        Self::start_temp(false).await
    }

    /// A throwaway server with production durability (`fsync`, `synchronous_commit` and
    /// `full_page_writes` on), for benchmarks whose figures must be durable ones.
    pub async fn start_durable() -> Result<Self, TestkitError> {
        Self::start_temp(true).await
    }

    async fn start_temp(durable: bool) -> Result<Self, TestkitError> {
        let bin = find_bindir()?;
        let run_as = RunAs::detect()?;
        with_free_ports("postgres", |[port]| {
            let (bin, run_as) = (bin.clone(), run_as.clone());
            async move {
                let dir = Home::temp("follow-pg-")?;
                Self::start_in(bin, dir, port, durable, &run_as).await
            }
        })
        .await
    }

    /// A server whose cluster lives in `dir` (made on the first start, durable settings, its
    /// password kept next to it) on `port`, with the database [`DATABASE`].
    pub async fn start_kept(dir: &Path, port: u16) -> Result<Self, TestkitError> {
        let (bin, dir) = (find_bindir()?, Home::kept(dir)?);
        Self::start_in(bin, dir, port, true, &RunAs::detect()?).await
    }

    async fn start_in(
        bin: PathBuf,
        dir: Home,
        port: u16,
        durable: bool,
        run_as: &RunAs,
    ) -> Result<Self, TestkitError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        run_as.own(dir.path())?;
        let fresh = !dir.path().join("data/PG_VERSION").exists();
        let password_file = dir.path().join(PASSWORD_FILE);
        if fresh {
            let password = uuid::Uuid::new_v4().simple().to_string();
            let _ = std::fs::remove_file(&password_file);
            std::io::Write::write_all(
                &mut std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&password_file)?,
                password.as_bytes(),
            )?;
            run_as.own(&password_file)?;
            let mut initdb = run_as.command(bin.join("initdb"));
            initdb
                .arg("-D")
                .arg(dir.path().join("data"))
                .args(["-U", "follow", "--auth=scram-sha-256", "-E", "UTF8"])
                .arg(format!("--pwfile={}", password_file.display()));
            if !durable {
                initdb.arg("--no-sync");
            }
            run("initdb", &mut initdb).await?;
        }
        let password = match std::fs::read_to_string(&password_file) {
            Ok(password) => password.trim().to_owned(),
            Err(e) => {
                return Err(TestkitError::NotReady {
                    what: "postgres",
                    detail: format!(
                        "{}: {e} (a cluster made before passwords: remove {} to start afresh)",
                        password_file.display(),
                        dir.path().display()
                    ),
                });
            }
        };
        let mut server = Self {
            bin,
            dir,
            port,
            password,
            durable,
            child: Guarded::default(),
        };
        server.spawn(run_as).await?;
        let mut createdb = Command::new(server.bin.join("createdb"));
        createdb
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "follow"])
            .env("PGPASSWORD", &server.password)
            .arg(DATABASE);
        if fresh {
            run("createdb", &mut createdb).await?;
        }
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The password of [`SERVICE_ROLE`] on this server (derived from the superuser's, so a
    /// kept cluster keeps it).
    pub fn service_password(&self) -> String {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(format!("{SERVICE_ROLE}:{}", self.password));
        hex::encode(&digest[..16])
    }

    /// `postgres://follow_api:PASSWORD@127.0.0.1:PORT/follow`: the service's least-privilege
    /// role, once its migration step made it.
    pub fn service_url(&self) -> String {
        format!(
            "postgres://{SERVICE_ROLE}:{}@127.0.0.1:{}/{DATABASE}",
            self.service_password(),
            self.port
        )
    }

    /// `postgres://follow:PASSWORD@127.0.0.1:PORT/follow`: the owner (superuser), for
    /// migrations and for tests that inspect or break things.
    pub fn url(&self) -> String {
        self.url_of(DATABASE)
    }

    /// The URL of another database on this server.
    pub fn url_of(&self, database: &str) -> String {
        format!(
            "postgres://follow:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// Stops the server cleanly (a "fast" shutdown: clients are disconnected, committed data is
    /// kept) for an outage; [`PostgresServer::restart`] brings it back with the same data.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let signalled = match child.id() {
            Some(pid) => Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .await
                .is_ok_and(|s| s.success()),
            None => false,
        };
        let stopped = signalled
            && tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
                .await
                .is_ok();
        if !stopped {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port with the same data.
    pub async fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop().await;
        self.spawn(&RunAs::detect()?).await
    }

    async fn spawn(&mut self, run_as: &RunAs) -> Result<(), TestkitError> {
        let data = self.dir.path().join("data");
        // A killed server leaves its pid file, which PostgreSQL would refuse to start over, and
        // its shared memory segment.
        release_shared_memory(&data);
        let _ = std::fs::remove_file(data.join("postmaster.pid"));
        let mut command = run_as.command(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string()])
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
            ])
            .args(["-c", "max_connections=100"]);
        if !self.durable {
            // A test's throwaway cluster: durability off, for speed.
            command
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off"]);
        }
        let pid_file = data.join("postmaster.pid");
        let child = spawn_ready(
            "postgres",
            command,
            &self.dir.path().join("postgres.log"),
            |pid| {
                let ready = pid.is_some_and(|pid| is_ready(&pid_file, pid));
                async move { ready }
            },
        )
        .await?;
        self.child = Guarded::new(child);
        Ok(())
    }
}

impl Drop for PostgresServer {
    /// The server is killed as its handle drops; its System V shared memory segment would
    /// outlive it (thousands of them pile up over test runs, until no server can start).
    fn drop(&mut self) {
        release_shared_memory(&self.dir.path().join("data"));
    }
}

/// Marks the System V shared memory segment the server of `data` made (its id is on the pid
/// file's 7th line, after the key) for removal: it goes once no process has it attached.
fn release_shared_memory(data: &Path) {
    let Ok(pid_file) = std::fs::read_to_string(data.join("postmaster.pid")) else {
        return;
    };
    let id = pid_file
        .lines()
        .nth(6)
        .and_then(|line| line.split_whitespace().nth(1))
        .filter(|id| id.bytes().all(|b| b.is_ascii_digit()));
    if let Some(id) = id {
        let _ = std::process::Command::new("ipcrm")
            .args(["-m", id])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Our server is up and accepting connections: its pid file names our process and says `ready`
/// (another test's server on a raced port would have its own pid file elsewhere).
fn is_ready(pid_file: &Path, pid: u32) -> bool {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return false;
    };
    let lines: Vec<&str> = text.lines().collect();
    lines.first().and_then(|l| l.trim().parse().ok()) == Some(pid)
        && lines.get(7).is_some_and(|l| l.trim() == "ready")
}

/// Whom the cluster runs as: ourselves, or (when we are root) the `postgres` user.
#[derive(Debug, Clone)]
enum RunAs {
    Me,
    Postgres { uid: u32, gid: u32 },
}

impl RunAs {
    fn detect() -> Result<Self, TestkitError> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|id| id.parse::<u32>().ok());
        if euid != Some(0) {
            return Ok(RunAs::Me);
        }
        let passwd = std::fs::read_to_string("/etc/passwd")?;
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&"postgres"))
            .and_then(|f| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
            .map(|(uid, gid)| RunAs::Postgres { uid, gid })
            .ok_or(TestkitError::NotFound {
                what: "the postgres user",
                hint: "running as root needs the `postgres` user (Debian's postgresql package makes it)",
            })
    }

    fn own(&self, dir: &Path) -> Result<(), TestkitError> {
        if let RunAs::Postgres { uid, gid } = self {
            std::os::unix::fs::chown(dir, Some(*uid), Some(*gid))?;
        }
        Ok(())
    }

    fn command(&self, program: PathBuf) -> Command {
        match self {
            RunAs::Me => Command::new(program),
            RunAs::Postgres { .. } => {
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid=postgres",
                    "--regid=postgres",
                    "--init-groups",
                    "--",
                ])
                .arg(program);
                c
            }
        }
    }
}

fn find_bindir() -> Result<PathBuf, TestkitError> {
    if let Some(dir) = std::env::var_os("FOLLOW_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
        .map(|(_, bin)| bin)
        .ok_or(TestkitError::NotFound {
            what: "PostgreSQL server binaries",
            hint: "run ./dev test (it installs them), or set FOLLOW_PG_BIN",
        })
}
