//! `follow.api.v1.ImageService`: an image's status, and the live watch of images or a route.

use std::sync::Arc;

use follow_proto::api::v1::{
    self as api, image_service_server::ImageService as ImageServiceApi,
    watch_image_status_request::Target as RequestTarget,
};
use tonic::{Request, Response, Status};

use crate::{
    auth::{caller, expiry},
    error::ApiError,
    state::{Shared, parse_id},
    store::{self, ImageStatus},
    watch::session::{MAX_IMAGES, Target, Watch, WatchStream},
};

#[derive(Debug, Clone)]
pub struct ImageService {
    shared: Arc<Shared>,
}

impl ImageService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn fail(&self, method: &'static str, e: ApiError) -> Status {
        self.shared.metrics.rpc_error(method, e.code());
        e.into()
    }

    async fn status(
        &self,
        request: Request<api::GetImageStatusRequest>,
    ) -> Result<api::GetImageStatusResponse, ApiError> {
        let user = caller(&request)?;
        let id = parse_id("image_id", &request.get_ref().image_id)?;
        let mut conn = self.shared.pool.acquire().await?;
        let image = store::images(&mut conn, &user.0, &[id])
            .await?
            .pop()
            .ok_or(ApiError::NotFound("image"))?;
        drop(conn);
        let live = match image.status {
            ImageStatus::Pending => self.shared.live_stages(&[image.id]).await.of(image.id),
            _ => None,
        };
        Ok(api::GetImageStatusResponse {
            image: Some(self.shared.image_view(&image, live).await),
        })
    }

    async fn watch(
        &self,
        request: Request<api::WatchImageStatusRequest>,
    ) -> Result<WatchStream, ApiError> {
        let user = caller(&request)?;
        // The stream ends when the token that opened it does.
        let until = expiry(&request).map_or_else(tokio::time::Instant::now, |at| {
            tokio::time::Instant::now()
                + at.duration_since(std::time::SystemTime::now())
                    .unwrap_or_default()
        });
        let slot = self.shared.watch_slot(&user)?;
        let request = request.into_inner();
        let target = match request.target {
            None => return Err(ApiError::invalid("target", "set `images` or `route_id`")),
            Some(RequestTarget::RouteId(id)) => Target::Route(parse_id("route_id", &id)?),
            Some(RequestTarget::Images(ids)) => {
                if ids.image_ids.is_empty() || ids.image_ids.len() > MAX_IMAGES {
                    return Err(ApiError::invalid(
                        "images.image_ids",
                        format!("must have 1-{MAX_IMAGES} ids"),
                    ));
                }
                let ids = ids
                    .image_ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| parse_id(&format!("images.image_ids[{i}]"), id))
                    .collect::<Result<_, _>>()?;
                Target::Images(ids)
            }
        };
        let watch = Watch::prepare(
            Arc::clone(&self.shared),
            user,
            target,
            &request.resume_cursor,
        )
        .await?;
        Ok(watch.into_stream(self.shared.cancel.clone(), until, slot))
    }
}

#[tonic::async_trait]
impl ImageServiceApi for ImageService {
    type WatchImageStatusStream = WatchStream;

    #[tracing::instrument(name = "GetImageStatus", skip_all)]
    async fn get_image_status(
        &self,
        request: Request<api::GetImageStatusRequest>,
    ) -> Result<Response<api::GetImageStatusResponse>, Status> {
        self.status(request)
            .await
            .map(Response::new)
            .map_err(|e| self.fail("GetImageStatus", e))
    }

    #[tracing::instrument(name = "WatchImageStatus", skip_all)]
    async fn watch_image_status(
        &self,
        request: Request<api::WatchImageStatusRequest>,
    ) -> Result<Response<Self::WatchImageStatusStream>, Status> {
        self.watch(request)
            .await
            .map(Response::new)
            .map_err(|e| self.fail("WatchImageStatus", e))
    }
}
