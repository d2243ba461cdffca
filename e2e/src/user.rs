//! One test's user of the platform: its own subject, token and routes, cleaned up after.

use std::time::Duration;

use follow_proto::{
    api::v1::{self as api, CreateRouteWithWaypointsResponse, WaypointInput},
    tonic::Status,
};
use follow_testkit::eventually_async;
use redis::AsyncCommands;
use uuid::Uuid;

use crate::{Platform, client::bearer};

/// How long a test waits for anything the platform does.
pub const WAIT: Duration = Duration::from_secs(60);

/// One scenario's user on the platform: its own subject, token and routes, removed again by
/// [`User::clean_up`] (so scenarios leave a shared `local` stack as they found it).
#[derive(Debug)]
pub struct User {
    pub sub: String,
    pub token: String,
    pub images: Vec<String>,
}

impl User {
    pub async fn new(platform: &Platform) -> Self {
        let sub = format!("e2e-{}", Uuid::new_v4().simple());
        let token = platform.token(&sub).await.unwrap();
        Self {
            sub,
            token,
            images: Vec::new(),
        }
    }

    /// A route whose waypoints have these markers, each for a JPEG of up to 5 MB.
    pub async fn create_route(
        &mut self,
        platform: &Platform,
        markers: &[(f64, f64)],
    ) -> CreateRouteWithWaypointsResponse {
        self.create_route_sized(platform, markers, 5_000_000).await
    }

    /// [`User::create_route`] for photos of up to `file_size` bytes.
    pub async fn create_route_sized(
        &mut self,
        platform: &Platform,
        markers: &[(f64, f64)],
        file_size: u64,
    ) -> CreateRouteWithWaypointsResponse {
        let created = self
            .try_create_route_sized(platform, markers, file_size)
            .await
            .unwrap();
        self.images
            .extend(created.upload_targets.iter().map(|t| t.image_id.clone()));
        created
    }

    /// [`User::create_route`]'s call, its refusal left to the caller (whose images, if it
    /// succeeds, the caller records).
    pub async fn try_create_route(
        &self,
        platform: &Platform,
        markers: &[(f64, f64)],
    ) -> Result<CreateRouteWithWaypointsResponse, Status> {
        self.try_create_route_sized(platform, markers, 5_000_000)
            .await
    }

    /// A route of one waypoint per content type, for photos of up to `file_size` bytes.
    pub async fn create_route_of_types(
        &mut self,
        platform: &Platform,
        content_types: &[&str],
        file_size: u64,
    ) -> CreateRouteWithWaypointsResponse {
        let waypoints = content_types
            .iter()
            .map(|content_type| WaypointInput {
                marker_x: 0.5,
                marker_y: 0.5,
                content_type: (*content_type).into(),
                file_size,
            })
            .collect();
        let created = self.try_create(platform, waypoints).await.unwrap();
        self.images
            .extend(created.upload_targets.iter().map(|t| t.image_id.clone()));
        created
    }

    async fn try_create_route_sized(
        &self,
        platform: &Platform,
        markers: &[(f64, f64)],
        file_size: u64,
    ) -> Result<CreateRouteWithWaypointsResponse, Status> {
        let waypoints = markers
            .iter()
            .map(|&(marker_x, marker_y)| WaypointInput {
                marker_x,
                marker_y,
                content_type: "image/jpeg".into(),
                file_size,
            })
            .collect();
        self.try_create(platform, waypoints).await
    }

    async fn try_create(
        &self,
        platform: &Platform,
        waypoints: Vec<WaypointInput>,
    ) -> Result<CreateRouteWithWaypointsResponse, Status> {
        let request = api::CreateRouteWithWaypointsRequest {
            request_id: Uuid::new_v4().to_string(),
            name: "e2e".into(),
            waypoints,
        };
        platform
            .routes()
            .await
            .unwrap()
            .create_route_with_waypoints(bearer(request, &self.token))
            .await
            .map(|created| created.into_inner())
    }

    pub async fn route(&self, platform: &Platform, route_id: &str) -> api::Route {
        let request = api::GetRouteRequest {
            route_id: route_id.into(),
        };
        platform
            .routes()
            .await
            .unwrap()
            .get_route(bearer(request, &self.token))
            .await
            .unwrap()
            .into_inner()
            .route
            .unwrap()
    }

    pub async fn image(&self, platform: &Platform, image_id: &str) -> api::Image {
        let request = api::GetImageStatusRequest {
            image_id: image_id.into(),
        };
        platform
            .images()
            .await
            .unwrap()
            .get_image_status(bearer(request, &self.token))
            .await
            .unwrap()
            .into_inner()
            .image
            .unwrap()
    }

    pub async fn wait_route(&self, platform: &Platform, route_id: &str, status: api::RouteStatus) {
        eventually_async(WAIT, "the route's status", || async {
            let route = self.route(platform, route_id).await;
            (route.status() == status).then_some(())
        })
        .await;
    }

    /// Deletes this user's routes (waypoints and images cascade) and its images' keys.
    pub async fn clean_up(self, platform: &Platform) {
        let db = platform.database().await.unwrap();
        // The API may be applying a late result to these rows right now: a deadlock between
        // the two is resolved by PostgreSQL aborting one side, and the cleanup tries again.
        eventually_async(WAIT, "the user's routes deleted", || async {
            match sqlx::query("DELETE FROM route.routes WHERE owner = $1")
                .bind(&self.sub)
                .execute(&db)
                .await
            {
                Ok(_) => Some(()),
                Err(sqlx::Error::Database(e))
                    if matches!(e.code().as_deref(), Some("40P01" | "40001")) =>
                {
                    None
                }
                Err(e) => panic!("{e}"),
            }
        })
        .await;
        let mut valkey = platform.valkey().await.unwrap();
        for id in &self.images {
            let id = crate::observe::uuid(id);
            let keys = [
                platform.partitions.status(id),
                platform.partitions.upload_guard(id),
            ];
            let _: () = valkey.del(&keys).await.unwrap();
        }
    }
}
