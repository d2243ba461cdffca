//! A running `follow-api` on a free loopback port, against its own real PostgreSQL and Valkey
//! (and Garage when a test needs real S3), with fresh keys, and clients for it.

use follow_service::config::FromEnv as _;
use std::{collections::HashMap, net::SocketAddr, time::SystemTime};

use follow_api::{
    app::Application,
    config::Config,
    schema::{self, ServiceRole},
};
use follow_bus::{Producer, ProgressTracker, Valkey, ValkeyConfig, acl::User};
use follow_proto::{
    api::v1::{image_service_client::ImageServiceClient, route_service_client::RouteServiceClient},
    tonic::{
        Request,
        transport::{Channel, Endpoint},
    },
};
use follow_testkit::{GarageServer, PostgresServer, ValkeyServer};
use follow_token::{SigningKey, UserClaims, VerifyingKey};
use sqlx::PgPool;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub struct Stack {
    pub pg: PostgresServer,
    pub valkey_server: ValkeyServer,
    pub garage: Option<GarageServer>,
    pub valkey: Valkey,
    pub pool: PgPool,
    pub addr: SocketAddr,
    pub user_key: SigningKey,
    pub upload_key: VerifyingKey,
    vars: Vars,
    cancel: CancellationToken,
    app: Option<JoinHandle<()>>,
}

/// Settings a test may change (on top of quick defaults).
pub type Vars = HashMap<&'static str, String>;

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(Vars::new(), false).await
    }

    pub async fn start_with(overrides: Vars, storage: bool) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("FOLLOW_LOG")
                    .unwrap_or_else(|_| "warn".into()),
            )
            .try_init();
        let (pg, valkey_server, garage) =
            tokio::join!(PostgresServer::start(), ValkeyServer::start(), async {
                if storage {
                    Some(GarageServer::start().await.unwrap())
                } else {
                    None
                }
            });
        let (pg, valkey_server) = (pg.unwrap(), valkey_server.unwrap());
        let user_key = SigningKey::generate("user-1".parse().unwrap());
        let upload = SigningKey::generate("upload-1".parse().unwrap());
        let mut vars: Vars = HashMap::from([
            ("FOLLOW_DATABASE_URL", pg.service_url()),
            ("FOLLOW_VALKEY_URL", valkey_server.url_as(User::Api)),
            (
                "FOLLOW_USER_PUBLIC_KEYS",
                format!("user-1={}", user_key.verifying_key().to_base64()),
            ),
            (
                "FOLLOW_UPLOAD_SIGNING_KEY",
                format!("upload-1={}", upload.to_base64()),
            ),
            ("FOLLOW_GATEWAY_URL", "http://gateway.test:8081".into()),
            ("FOLLOW_S3_ACCESS_KEY_ID", "GKtest".into()),
            ("FOLLOW_S3_SECRET_ACCESS_KEY", "test-secret".into()),
            ("FOLLOW_CONSUMER_NAME", "api-test".into()),
            ("FOLLOW_MAX_FILE_SIZE", "10000000".into()),
        ]);
        if let Some(g) = &garage {
            vars.extend(g.service_env());
        }
        vars.extend(overrides);
        // As in production: the owner migrates, the service runs as its own role.
        let pool = PgPool::connect(&pg.url()).await.unwrap();
        let role = ServiceRole::new(
            ServiceRole::DEFAULT_NAME,
            Some(pg.service_password().into()),
        )
        .unwrap();
        schema::migrate(&pool, &role).await.unwrap();
        let (addr, cancel, app) = launch(&vars, "127.0.0.1:0").await;
        let valkey = Valkey::new(ValkeyConfig::new(valkey_server.url())).unwrap();
        Self {
            pg,
            valkey_server,
            garage,
            valkey,
            pool,
            addr,
            user_key,
            upload_key: upload.verifying_key(),
            vars,
            cancel,
            app: Some(app),
        }
    }

    /// Stops the service and starts it again on the same port, databases untouched.
    pub async fn restart(&mut self) {
        self.stop().await;
        let (addr, cancel, app) = launch(&self.vars, &self.addr.to_string()).await;
        (self.addr, self.cancel, self.app) = (addr, cancel, Some(app));
    }

    /// Stops the service gracefully and waits until everything of it has ended.
    pub async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(app) = self.app.take() {
            app.await.unwrap();
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn token(&self, sub: &str) -> String {
        self.user_key
            .sign(&UserClaims::new(
                sub,
                SystemTime::now(),
                std::time::Duration::from_secs(600),
            ))
            .unwrap()
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn routes(&self) -> RouteServiceClient<Channel> {
        RouteServiceClient::new(self.channel().await)
    }

    pub async fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel().await)
    }

    /// `message` with `sub`'s bearer token.
    pub fn as_user<T>(&self, sub: &str, message: T) -> Request<T> {
        bearer(message, &self.token(sub))
    }

    pub fn producer(&self) -> Producer {
        Producer::new(&self.valkey).unwrap()
    }

    pub fn tracker(&self) -> ProgressTracker {
        ProgressTracker::new(&self.valkey).unwrap()
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("{}{path}", self.url())).await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }
}

async fn launch(vars: &Vars, addr: &str) -> (SocketAddr, CancellationToken, JoinHandle<()>) {
    let config = Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
    let listener = TcpListener::bind(addr).await.unwrap();
    let application = Application::build(config, listener).await.unwrap();
    let addr = application.local_addr();
    let cancel = CancellationToken::new();
    let app = tokio::spawn({
        let cancel = cancel.clone();
        async move { application.run(cancel).await.unwrap() }
    });
    (addr, cancel, app)
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// A new route of `waypoints` JPEG waypoints (a fresh `request_id`).
pub fn route_request(waypoints: usize) -> follow_proto::api::v1::CreateRouteWithWaypointsRequest {
    use follow_proto::api::v1 as api;
    api::CreateRouteWithWaypointsRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        name: "a route".into(),
        waypoints: (0..waypoints)
            .map(|_| api::WaypointInput {
                marker_x: 0.5,
                marker_y: 0.5,
                content_type: "image/jpeg".into(),
                file_size: 1000,
            })
            .collect(),
    }
}
