//! `follow.api.v1.RouteService`: routes, waypoints, and the upload targets of their photos.

use std::{sync::Arc, time::SystemTime};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use follow_bus::{Progress, Stage};
use follow_proto::api::v1::{self as api, route_service_server::RouteService as RouteServiceApi};
use follow_token::{UploadClaims, UploadGrant};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    auth::{User, caller},
    error::{ApiError, FieldViolation},
    state::{Shared, parse_id},
    store::{self, ImageRecord, ImageStatus, NewImage, NewWaypoint, PageKey, RouteStatus},
};
use follow_bus::CONTENT_TYPES;
use follow_proto::time::timestamp;
use follow_service::objects::storage_key;

/// The most waypoints a route has.
pub const MAX_WAYPOINTS: usize = 100;
const DEFAULT_PAGE: u32 = 20;
const MAX_PAGE: u32 = 100;

#[derive(Debug, Clone)]
pub struct RouteService {
    shared: Arc<Shared>,
}

impl RouteService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Maps an RPC's error to its status, counting it by method and code.
    fn finish<T>(
        &self,
        method: &'static str,
        result: Result<T, ApiError>,
    ) -> Result<Response<T>, Status> {
        result.map(Response::new).map_err(|e| {
            self.shared.metrics.rpc_error(method, e.code());
            e.into()
        })
    }

    async fn create(
        &self,
        user: &User,
        request: api::CreateRouteWithWaypointsRequest,
    ) -> Result<api::CreateRouteWithWaypointsResponse, ApiError> {
        validate_create(&request, self.shared.limits.max_file_size)?;
        self.shared
            .charge_tokens(user, request.waypoints.len())
            .await?;
        let mut tx = self.shared.pool.begin().await?;
        if let Some(id) = store::route_by_request(&mut tx, &user.0, &request.request_id).await? {
            drop(tx);
            return self.existing(user, id).await;
        }
        let route_id = Uuid::now_v7();
        let (expires_at, next_check_at) = self.shared.limits.new_image_times();
        let waypoints: Vec<NewWaypoint> = request
            .waypoints
            .iter()
            .map(|w| {
                let image_id = Uuid::now_v7();
                NewWaypoint {
                    id: Uuid::now_v7(),
                    marker_x: w.marker_x,
                    marker_y: w.marker_y,
                    image: NewImage {
                        id: image_id,
                        content_type: w.content_type.clone(),
                        declared_size: i64::try_from(w.file_size).unwrap_or(i64::MAX),
                        storage_key: storage_key(route_id, image_id),
                        expires_at,
                        next_check_at,
                    },
                }
            })
            .collect();
        let inserted = store::insert_route(
            &mut tx,
            route_id,
            &user.0,
            &request.request_id,
            &request.name,
            &waypoints,
        )
        .await?;
        if !inserted {
            // A concurrent call with the same request_id committed first.
            drop(tx);
            let id = store::route_by_request(
                &mut *self.shared.pool.acquire().await?,
                &user.0,
                &request.request_id,
            )
            .await?
            .ok_or_else(|| ApiError::Internal("request_id conflict without a route".into()))?;
            return self.existing(user, id).await;
        }
        // Written before the commit: if Valkey cannot take it, nothing is created.
        let queued: Vec<Progress> = waypoints
            .iter()
            .map(|w| Progress::reached(w.image.id, Stage::Queued))
            .collect();
        self.shared.record_progress(&queued).await?;
        tx.commit().await?;
        tracing::info!(%route_id, waypoints = waypoints.len(), "route created");
        self.existing(user, route_id).await
    }

    /// The route with upload targets for its images still waiting for an upload.
    async fn existing(
        &self,
        user: &User,
        id: Uuid,
    ) -> Result<api::CreateRouteWithWaypointsResponse, ApiError> {
        let mut conn = self.shared.pool.acquire().await?;
        let route = store::route(&mut conn, &user.0, id)
            .await?
            .ok_or(ApiError::NotFound("route"))?;
        drop(conn);
        let mut targets = Vec::new();
        for w in &route.waypoints {
            if w.image.status == ImageStatus::Pending
                && w.image.expires_at > OffsetDateTime::now_utc()
            {
                targets.push(self.target(user, &w.image)?);
            }
        }
        Ok(api::CreateRouteWithWaypointsResponse {
            route: Some(self.shared.route_view(&route).await),
            upload_targets: targets,
        })
    }

    /// A signed upload target for a pending image, valid until the image's expiry.
    fn target(&self, user: &User, image: &ImageRecord) -> Result<api::UploadTarget, ApiError> {
        let now = OffsetDateTime::now_utc();
        let ttl = (image.expires_at - now).try_into().unwrap_or_default();
        let max_file_size = u64::try_from(image.declared_size).unwrap_or(0);
        let claims = UploadClaims::new(
            UploadGrant {
                sub: user.0.clone(),
                image_id: image.id,
                storage_key: image.storage_key.clone(),
                content_type: image.content_type.clone(),
                max_file_size,
            },
            SystemTime::from(now),
            ttl,
        );
        let token = self
            .shared
            .signing_key
            .sign(&claims)
            .map_err(ApiError::Token)?;
        Ok(api::UploadTarget {
            image_id: image.id.to_string(),
            waypoint_id: image.waypoint_id.to_string(),
            upload_url: format!("{}/upload?token={token}", self.shared.limits.gateway_url),
            token,
            expires_at: Some(timestamp(image.expires_at)),
            max_file_size,
            content_type: image.content_type.clone(),
        })
    }

    async fn get(
        &self,
        user: &User,
        request: api::GetRouteRequest,
    ) -> Result<api::GetRouteResponse, ApiError> {
        let id = parse_id("route_id", &request.route_id)?;
        let mut conn = self.shared.pool.acquire().await?;
        let route = store::route(&mut conn, &user.0, id)
            .await?
            .ok_or(ApiError::NotFound("route"))?;
        drop(conn);
        Ok(api::GetRouteResponse {
            route: Some(self.shared.route_view(&route).await),
        })
    }

    async fn list(
        &self,
        user: &User,
        request: api::ListRoutesRequest,
    ) -> Result<api::ListRoutesResponse, ApiError> {
        let size = match request.page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(decode_page_token(token)?),
        };
        let mut conn = self.shared.pool.acquire().await?;
        let mut page = store::route_page(&mut conn, &user.0, after, i64::from(size) + 1).await?;
        let next = if page.len() > size as usize {
            page.truncate(size as usize);
            page.last().copied().map(encode_page_token)
        } else {
            None
        };
        let ids: Vec<Uuid> = page.iter().map(|key| key.id).collect();
        let routes = store::routes(&mut conn, &user.0, &ids).await?;
        drop(conn);
        let mut views = Vec::with_capacity(routes.len());
        for route in &routes {
            views.push(self.shared.route_view(route).await);
        }
        Ok(api::ListRoutesResponse {
            routes: views,
            next_page_token: next.unwrap_or_default(),
        })
    }

    async fn publish(
        &self,
        user: &User,
        request: api::PublishRouteRequest,
    ) -> Result<api::PublishRouteResponse, ApiError> {
        let id = parse_id("route_id", &request.route_id)?;
        let mut conn = self.shared.pool.acquire().await?;
        let published = store::publish(&mut conn, &user.0, id).await?;
        let route = store::route(&mut conn, &user.0, id)
            .await?
            .ok_or(ApiError::NotFound("route"))?;
        drop(conn);
        // Publishing a published route again is a no-op, so a retried call succeeds.
        if !published && route.status != RouteStatus::Published {
            let subjects = route
                .waypoints
                .iter()
                .filter(|w| w.status != store::WaypointStatus::Confirmed)
                .map(|w| {
                    (
                        format!("waypoints/{}", w.id),
                        format!(
                            "waypoint {} has no processed image (its image is {:?})",
                            w.position, w.image.status
                        ),
                    )
                })
                .collect();
            return Err(ApiError::FailedPrecondition {
                message: "only a READY route can be published: some waypoints are not confirmed"
                    .into(),
                subjects,
            });
        }
        if published {
            tracing::info!(route_id = %id, "route published");
        }
        Ok(api::PublishRouteResponse {
            route: Some(self.shared.route_view(&route).await),
        })
    }

    async fn reissue(
        &self,
        user: &User,
        request: api::ReissueUploadRequest,
    ) -> Result<api::ReissueUploadResponse, ApiError> {
        let waypoint_id = parse_id("waypoint_id", &request.waypoint_id)?;
        let mut violations = Vec::new();
        if !request.content_type.is_empty() {
            check_content_type(&mut violations, "content_type", &request.content_type);
        }
        if request.file_size != 0 {
            check_size(
                &mut violations,
                "file_size",
                request.file_size,
                self.shared.limits.max_file_size,
            );
        }
        if !violations.is_empty() {
            return Err(ApiError::InvalidArgument(violations));
        }
        self.shared.charge_tokens(user, 1).await?;
        let mut tx = self.shared.pool.begin().await?;
        let current = store::waypoint_for_update(&mut tx, &user.0, waypoint_id)
            .await?
            .ok_or(ApiError::NotFound("waypoint"))?;
        if !matches!(current.status, ImageStatus::Failed | ImageStatus::Expired) {
            return Err(ApiError::FailedPrecondition {
                message: "only a waypoint whose image FAILED or EXPIRED gets a new upload".into(),
                subjects: vec![(
                    format!("images/{}", current.id),
                    format!("the waypoint's image is {:?}", current.status),
                )],
            });
        }
        let image_id = Uuid::now_v7();
        let (expires_at, next_check_at) = self.shared.limits.new_image_times();
        let image = NewImage {
            id: image_id,
            content_type: if request.content_type.is_empty() {
                current.content_type.clone()
            } else {
                request.content_type.clone()
            },
            declared_size: if request.file_size == 0 {
                current.declared_size
            } else {
                i64::try_from(request.file_size).unwrap_or(i64::MAX)
            },
            storage_key: storage_key(current.route_id, image_id),
            expires_at,
            next_check_at,
        };
        let record = store::reissue(&mut tx, current.route_id, waypoint_id, &image).await?;
        self.shared
            .record_progress(&[Progress::reached(image_id, Stage::Queued)])
            .await?;
        tx.commit().await?;
        tracing::info!(%waypoint_id, %image_id, old_image_id = %current.id, "upload reissued");
        Ok(api::ReissueUploadResponse {
            upload_target: Some(self.target(user, &record)?),
            image: Some(self.shared.image_view(&record, Some(Stage::Queued)).await),
        })
    }
}

fn validate_create(
    request: &api::CreateRouteWithWaypointsRequest,
    max_file_size: u64,
) -> Result<(), ApiError> {
    let mut v = Vec::new();
    if request.request_id.is_empty()
        || request.request_id.len() > 128
        || has_control(&request.request_id)
    {
        v.push(FieldViolation::new(
            "request_id",
            "must be 1-128 bytes without control characters (a UUID is best)",
        ));
    }
    if request.name.chars().count() > 200 || has_control(&request.name) {
        v.push(FieldViolation::new(
            "name",
            "must be at most 200 characters, without control characters",
        ));
    }
    if request.waypoints.is_empty() || request.waypoints.len() > MAX_WAYPOINTS {
        v.push(FieldViolation::new(
            "waypoints",
            format!("must have 1-{MAX_WAYPOINTS} waypoints"),
        ));
    }
    for (i, w) in request.waypoints.iter().enumerate().take(MAX_WAYPOINTS) {
        for (axis, value) in [("marker_x", w.marker_x), ("marker_y", w.marker_y)] {
            if !(0.0..=1.0).contains(&value) {
                v.push(FieldViolation::new(
                    format!("waypoints[{i}].{axis}"),
                    "must be within 0.0-1.0",
                ));
            }
        }
        check_content_type(
            &mut v,
            &format!("waypoints[{i}].content_type"),
            &w.content_type,
        );
        check_size(
            &mut v,
            &format!("waypoints[{i}].file_size"),
            w.file_size,
            max_file_size,
        );
    }
    if v.is_empty() {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(v))
    }
}

/// NUL and the other control characters have no place in a name or an id (and PostgreSQL
/// refuses NUL in text).
fn has_control(text: &str) -> bool {
    text.chars().any(char::is_control)
}

fn check_content_type(v: &mut Vec<FieldViolation>, field: &str, content_type: &str) {
    if !CONTENT_TYPES.contains(&content_type) {
        v.push(FieldViolation::new(
            field,
            format!("must be one of {}", CONTENT_TYPES.join(", ")),
        ));
    }
}

fn check_size(v: &mut Vec<FieldViolation>, field: &str, size: u64, max: u64) {
    if size == 0 || size > max {
        v.push(FieldViolation::new(field, format!("must be 1-{max} bytes")));
    }
}

fn encode_page_token(key: PageKey) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{}:{}",
        key.created_at.unix_timestamp_nanos(),
        key.id
    ))
}

fn decode_page_token(token: &str) -> Result<PageKey, ApiError> {
    let bad = || ApiError::invalid("page_token", "not a page token of ListRoutes");
    if token.len() > 128 {
        return Err(bad());
    }
    let text =
        String::from_utf8(URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?).map_err(|_| bad())?;
    let (nanos, id) = text.split_once(':').ok_or_else(bad)?;
    Ok(PageKey {
        created_at: nanos
            .parse::<i128>()
            .ok()
            .and_then(|n| OffsetDateTime::from_unix_timestamp_nanos(n).ok())
            .ok_or_else(bad)?,
        id: Uuid::try_parse(id).map_err(|_| bad())?,
    })
}

#[tonic::async_trait]
impl RouteServiceApi for RouteService {
    #[tracing::instrument(name = "CreateRouteWithWaypoints", skip_all)]
    async fn create_route_with_waypoints(
        &self,
        request: Request<api::CreateRouteWithWaypointsRequest>,
    ) -> Result<Response<api::CreateRouteWithWaypointsResponse>, Status> {
        let result = async {
            let user = caller(&request)?;
            self.create(&user, request.into_inner()).await
        };
        self.finish("CreateRouteWithWaypoints", result.await)
    }

    #[tracing::instrument(name = "GetRoute", skip_all)]
    async fn get_route(
        &self,
        request: Request<api::GetRouteRequest>,
    ) -> Result<Response<api::GetRouteResponse>, Status> {
        let result = async {
            let user = caller(&request)?;
            self.get(&user, request.into_inner()).await
        };
        self.finish("GetRoute", result.await)
    }

    #[tracing::instrument(name = "ListRoutes", skip_all)]
    async fn list_routes(
        &self,
        request: Request<api::ListRoutesRequest>,
    ) -> Result<Response<api::ListRoutesResponse>, Status> {
        let result = async {
            let user = caller(&request)?;
            self.list(&user, request.into_inner()).await
        };
        self.finish("ListRoutes", result.await)
    }

    #[tracing::instrument(name = "PublishRoute", skip_all)]
    async fn publish_route(
        &self,
        request: Request<api::PublishRouteRequest>,
    ) -> Result<Response<api::PublishRouteResponse>, Status> {
        let result = async {
            let user = caller(&request)?;
            self.publish(&user, request.into_inner()).await
        };
        self.finish("PublishRoute", result.await)
    }

    #[tracing::instrument(name = "ReissueUpload", skip_all)]
    async fn reissue_upload(
        &self,
        request: Request<api::ReissueUploadRequest>,
    ) -> Result<Response<api::ReissueUploadResponse>, Status> {
        let result = async {
            let user = caller(&request)?;
            self.reissue(&user, request.into_inner()).await
        };
        self.finish("ReissueUpload", result.await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        let key = PageKey {
            created_at: OffsetDateTime::from_unix_timestamp_nanos(1_795_000_000_123_456_000)
                .unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(decode_page_token(&encode_page_token(key)).unwrap(), key);
        for garbage in [
            "x",
            "!!!",
            &URL_SAFE_NO_PAD.encode("12:not-a-uuid"),
            &"A".repeat(1000),
        ] {
            assert!(decode_page_token(garbage).is_err());
        }
    }

    #[test]
    fn validation_names_every_bad_field() {
        let request = api::CreateRouteWithWaypointsRequest {
            request_id: String::new(),
            name: "n".into(),
            waypoints: vec![api::WaypointInput {
                marker_x: f64::NAN,
                marker_y: 1.5,
                content_type: "image/gif".into(),
                file_size: 0,
            }],
        };
        let Err(ApiError::InvalidArgument(v)) = validate_create(&request, 100) else {
            panic!("accepted");
        };
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "request_id",
                "waypoints[0].marker_x",
                "waypoints[0].marker_y",
                "waypoints[0].content_type",
                "waypoints[0].file_size"
            ]
        );
    }
}
