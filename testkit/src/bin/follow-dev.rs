//! `follow-dev`: the local platform `./dev up` runs, started with the test kit's own starters —
//! kept data under `$FOLLOW_HOME` (default `.follow/`) and fixed loopback ports — instead of a
//! second copy of them in bash: Valkey (append-only), PostgreSQL (durable), Garage (S3: layout,
//! key and bucket made once), then `follow-api` and `follow-image-gateway` (keys made once with
//! `follow-api keygen`; the database migrated by `follow-api migrate` as its owner, the API
//! running as its least-privilege role). Valkey has the platform's ACL users with passwords
//! made afresh at each start, PostgreSQL a SCRAM password made with its cluster. When both
//! services answer `/health`
//! it writes `$FOLLOW_HOME/run/stack.env` (mode 0600: the addresses with the operators'
//! credentials of Valkey, PostgreSQL and S3, for `./dev` and the `local` end-to-end mode) and
//! runs until SIGINT or SIGTERM, then stops everything, services first.
//!
//! With `FOLLOW_DEV_CLUSTER=1` (`./dev up --cluster`) Valkey is a cluster of three primaries and
//! three replicas instead (on free ports, its data not kept), and two instances of each service
//! run (the second ones on the ports after the first ones').
//!
//! | variable | default |
//! |---|---|
//! | `FOLLOW_HOME` | `.follow` |
//! | `FOLLOW_BIN_DIR` | `target/debug` (where `follow-api` and `follow-image-gateway` are) |
//! | `FOLLOW_VALKEY_PORT`, `FOLLOW_PG_PORT`, `FOLLOW_S3_PORT`, `FOLLOW_GARAGE_RPC_PORT`, `FOLLOW_GARAGE_ADMIN_PORT` | 16379, 15432, 3900, 3901, 3903 |
//! | `FOLLOW_API_PORT`, `FOLLOW_GATEWAY_PORT` | 8080, 8081 |
//! | `FOLLOW_S3_BUCKET` | `follow-images` (`./dev up`'s own bucket, made by this) |
#![forbid(unsafe_code)]

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use follow_testkit::ValkeyUser as User;
use follow_testkit::{
    GarageServer, PostgresServer, ServiceProcess, ValkeyCluster, ValkeyDeployment, ValkeyServer,
    eventually_async,
};

fn port(name: &str, default: u16) -> u16 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("follow-dev: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(up()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("follow-dev: {e}");
            ExitCode::FAILURE
        }
    }
}

type Error = Box<dyn std::error::Error>;

/// Where the local platform keeps its data, logs and run files, and finds its binaries.
struct Dirs {
    home: PathBuf,
    bin: PathBuf,
    logs: PathBuf,
    run: PathBuf,
}

impl Dirs {
    fn from_env() -> Result<Self, Error> {
        let home = PathBuf::from(std::env::var("FOLLOW_HOME").unwrap_or_else(|_| ".follow".into()));
        let bin = PathBuf::from(
            std::env::var("FOLLOW_BIN_DIR").unwrap_or_else(|_| "target/debug".into()),
        );
        let (logs, run) = (home.join("logs"), home.join("run"));
        std::fs::create_dir_all(&logs)?;
        std::fs::create_dir_all(&run)?;
        Ok(Self {
            home,
            bin,
            logs,
            run,
        })
    }
}

/// The servers the services run on, and the bucket they use.
struct Servers {
    valkey: ValkeyDeployment,
    postgres: PostgresServer,
    garage: GarageServer,
    bucket: String,
}

impl Servers {
    /// What every service is given: its Valkey user, S3 and the log format, then `extra`.
    fn env(&self, user: User, extra: &[(&str, String)]) -> Vec<(String, String)> {
        let s3 = self.garage.service_env().map(|(k, v)| match k {
            "FOLLOW_S3_BUCKET" => (k, self.bucket.clone()),
            _ => (k, v),
        });
        [
            ("FOLLOW_VALKEY_URL", self.valkey.url_as(user)),
            (
                "FOLLOW_LOG_FORMAT",
                std::env::var("FOLLOW_LOG_FORMAT").unwrap_or_else(|_| "json".into()),
            ),
        ]
        .into_iter()
        .chain(s3)
        .chain(extra.iter().cloned())
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    async fn stop(mut self) {
        self.valkey.shut_down().await;
        self.postgres.stop().await;
        self.garage.stop().await;
    }
}

/// The `(private, public)` key pairs the services sign and verify with.
struct Keys {
    upload: (String, String),
    user: (String, String),
}

/// One gateway and one API, instance `n` (0 for the first).
struct Instance {
    gateway: ServiceProcess,
    api: ServiceProcess,
}

async fn up() -> Result<(), Error> {
    let dirs = Dirs::from_env()?;
    let _ = std::fs::remove_file(dirs.run.join("stack.env"));
    let bucket = std::env::var("FOLLOW_S3_BUCKET").unwrap_or_else(|_| "follow-images".into());
    let cluster = std::env::var("FOLLOW_DEV_CLUSTER").is_ok_and(|v| v == "1");
    let servers = servers(&dirs.home, bucket, cluster).await?;
    migrate(&dirs.bin, &servers.postgres)?;
    let keys = Keys {
        upload: keys(&dirs.bin, &dirs.home.join("keys"), "upload")?,
        user: keys(&dirs.bin, &dirs.home.join("keys"), "user")?,
    };
    let mut instances = Vec::new();
    for n in 0..if cluster { 2 } else { 1 } {
        instances.push(start_instance(n, &dirs, &servers, &keys).await?);
    }
    for url in instances
        .iter()
        .flat_map(|i| [i.api.url(), i.gateway.url()])
    {
        eventually_async(
            Duration::from_secs(60),
            &format!("{url}/health"),
            || async { answers_health(&url).await.then_some(()) },
        )
        .await;
    }
    write_stack_env(&dirs.run, &instances[0], &servers)?;
    eprintln!(
        "==> up (data in {}, logs in {})",
        dirs.home.display(),
        dirs.logs.display()
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("==> stopping");
    let _ = std::fs::remove_file(dirs.run.join("stack.env"));
    for mut instance in instances {
        instance.api.terminate(Duration::from_secs(30)).await;
        instance.gateway.terminate(Duration::from_secs(30)).await;
    }
    servers.stop().await;
    eprintln!("==> stopped; data kept in {}", dirs.home.display());
    Ok(())
}

/// Instance `n` of the gateway and the API, on the ports after instance `n - 1`'s; the first
/// logs in the logs directory, the others in `instance-N` beside it.
async fn start_instance(
    n: u16,
    dirs: &Dirs,
    servers: &Servers,
    keys: &Keys,
) -> Result<Instance, Error> {
    let gateway_port = port("FOLLOW_GATEWAY_PORT", 8081) + 2 * n;
    let api_port = port("FOLLOW_API_PORT", 8080) + 2 * n;
    let name = |service: &str| format!("{service}-local-{}", n + 1);
    let logs = match n {
        0 => dirs.logs.clone(),
        _ => dirs.logs.join(format!("instance-{}", n + 1)),
    };
    eprintln!("==> follow-image-gateway on 127.0.0.1:{gateway_port}, follow-api on :{api_port}");
    let gateway = ServiceProcess::start_kept(
        "follow-image-gateway",
        &dirs.bin.join("follow-image-gateway"),
        servers.env(
            User::Gateway,
            &[
                ("FOLLOW_UPLOAD_PUBLIC_KEYS", keys.upload.1.clone()),
                ("FOLLOW_CONSUMER_NAME", name("gateway")),
            ],
        ),
        "FOLLOW_GATEWAY_LISTEN",
        gateway_port,
        &logs,
    )
    .await?;
    let api = ServiceProcess::start_kept(
        "follow-api",
        &dirs.bin.join("follow-api"),
        servers.env(
            User::Api,
            &[
                ("FOLLOW_DATABASE_URL", servers.postgres.service_url()),
                ("FOLLOW_USER_PUBLIC_KEYS", keys.user.1.clone()),
                ("FOLLOW_UPLOAD_SIGNING_KEY", keys.upload.0.clone()),
                ("FOLLOW_GATEWAY_URL", gateway.url()),
                ("FOLLOW_CONSUMER_NAME", name("api")),
            ],
        ),
        "FOLLOW_API_LISTEN",
        api_port,
        &logs,
    )
    .await?;
    Ok(Instance { gateway, api })
}

/// `GET {url}/health` says 200 (a plain HTTP/1.1 exchange: no client library needed).
async fn answers_health(url: &str) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Some(authority) = url.strip_prefix("http://") else {
        return false;
    };
    let Ok(mut stream) = tokio::net::TcpStream::connect(authority).await else {
        return false;
    };
    let request = format!("GET /health HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.is_ok() && head.ends_with(b"200")
}

/// `run/stack.env` (mode 0600): the addresses, with the operators' credentials of Valkey,
/// PostgreSQL and S3, for `./dev` and the `local` end-to-end mode.
fn write_stack_env(run: &Path, first: &Instance, servers: &Servers) -> Result<(), Error> {
    let Servers {
        valkey,
        postgres,
        garage,
        bucket,
    } = servers;
    write_private(
        &run.join("stack.env"),
        &format!(
            "API={}\nGATEWAY={}\nVALKEY={}\nDATABASE={}\nS3={}\nS3_BUCKET={bucket}\n\
             AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\n",
            first.api.url(),
            first.gateway.url(),
            valkey.url_as(User::Admin),
            postgres.url(),
            garage.endpoint(),
            garage.access_key(),
            garage.secret_key(),
        ),
    )?;
    Ok(())
}

/// Valkey (one node, or a cluster), PostgreSQL and Garage with their data kept under `home`
/// (but a cluster's), on their ports, with the bucket made.
async fn servers(home: &Path, bucket: String, cluster: bool) -> Result<Servers, Error> {
    let (valkey_port, pg_port) = (
        port("FOLLOW_VALKEY_PORT", 16379),
        port("FOLLOW_PG_PORT", 15432),
    );
    let s3_ports = [
        port("FOLLOW_S3_PORT", 3900),
        port("FOLLOW_GARAGE_RPC_PORT", 3901),
        port("FOLLOW_GARAGE_ADMIN_PORT", 3903),
    ];
    eprintln!(
        "==> Valkey on 127.0.0.1:{}, PostgreSQL on :{pg_port}, Garage (S3) on :{}",
        if cluster {
            "(a cluster of 3 + 3 on free ports)".to_owned()
        } else {
            valkey_port.to_string()
        },
        s3_ports[0]
    );
    let dirs = (
        home.join("valkey"),
        home.join("postgres"),
        home.join("garage"),
    );
    let valkey = async {
        Ok::<_, follow_testkit::TestkitError>(if cluster {
            ValkeyDeployment::Cluster(ValkeyCluster::start().await?)
        } else {
            ValkeyDeployment::Node(Box::new(
                ValkeyServer::start_kept(&dirs.0, valkey_port).await?,
            ))
        })
    };
    let (valkey, postgres, garage) = tokio::join!(
        valkey,
        PostgresServer::start_kept(&dirs.1, pg_port),
        GarageServer::start_kept(&dirs.2, s3_ports),
    );
    let (valkey, postgres, garage) = (valkey?, postgres?, garage?);
    garage.ensure_bucket(&bucket).await?;
    Ok(Servers {
        valkey,
        postgres,
        garage,
        bucket,
    })
}

/// Runs `bin/follow-api args` with `env` added; its standard output, or its error.
fn follow_api(bin: &Path, args: &[&str], env: &[(&str, String)]) -> Result<String, Error> {
    let out = std::process::Command::new(bin.join("follow-api"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "follow-api {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `follow-api migrate` as the database's owner: the schema, and the least-privilege role the
/// API runs as.
fn migrate(bin: &Path, postgres: &PostgresServer) -> Result<(), Error> {
    let env = [
        ("FOLLOW_DATABASE_OWNER_URL", postgres.url()),
        (
            "FOLLOW_DATABASE_SERVICE_PASSWORD",
            postgres.service_password(),
        ),
    ];
    follow_api(bin, &["migrate"], &env).map(drop)
}

/// The `kid=private` / `kid=public` pair `name` in `dir`, made once with `follow-api keygen`.
fn keys(bin: &Path, dir: &Path, name: &str) -> Result<(String, String), Error> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let (private, public) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
    );
    if !private.exists() {
        let text = follow_api(bin, &["keygen", "--kid", &format!("{name}-1")], &[])?;
        let mut lines = text.lines().filter(|l| !l.starts_with('#'));
        let (Some(key), Some(public_key)) = (lines.next(), lines.next()) else {
            return Err("unexpected keygen output".into());
        };
        write_private(&private, &format!("{key}\n"))?;
        std::fs::write(&public, format!("{public_key}\n"))?;
    }
    Ok((
        std::fs::read_to_string(&private)?.trim().to_owned(),
        std::fs::read_to_string(&public)?.trim().to_owned(),
    ))
}

/// Writes `text` to `path` (replacing it), readable by its owner only.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::remove_file(path);
    std::io::Write::write_all(
        &mut std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?,
        text.as_bytes(),
    )
}
