//! Database records as API messages: the one place rows become `follow.api.v1` views. Pure:
//! live stages are handed in; URLs are left empty, for `Shared::sign` to fill.

use std::collections::HashMap;

use follow_bus::{ErrorCode, MetadataKind, Stage};
use follow_proto::{api::v1 as api, events::v1 as events, time::timestamp};
use uuid::Uuid;

use crate::store::{ImageRecord, ImageStatus, RouteRecord, RouteStatus, WaypointStatus};

/// The live stages of pending images, from Valkey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveStages {
    /// Each asked image's stage; an image Valkey has nothing for is `Queued` (not uploaded yet,
    /// or its status expired).
    Known(HashMap<Uuid, Stage>),
    /// Valkey could not be asked: stages are unknown (reads go on without them).
    Unavailable,
}

impl LiveStages {
    pub fn of(&self, id: Uuid) -> Option<Stage> {
        match self {
            Self::Known(stages) => Some(stages.get(&id).copied().unwrap_or(Stage::Queued)),
            Self::Unavailable => None,
        }
    }
}

/// The API message of one image, without URLs; `live` is its pipeline stage while PENDING.
pub fn image(record: &ImageRecord, live: Option<Stage>) -> api::Image {
    let stage = match record.status {
        ImageStatus::Pending => live.map_or(events::Stage::Unspecified, events::Stage::from),
        ImageStatus::Processed => events::Stage::Done,
        ImageStatus::Failed | ImageStatus::Expired => events::Stage::Failed,
    };
    let dim = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    api::Image {
        id: record.id.to_string(),
        route_id: record.route_id.to_string(),
        waypoint_id: record.waypoint_id.to_string(),
        status: match record.status {
            ImageStatus::Pending => api::ImageStatus::Pending,
            ImageStatus::Processed => api::ImageStatus::Processed,
            ImageStatus::Failed => api::ImageStatus::Failed,
            ImageStatus::Expired => api::ImageStatus::Expired,
        }
        .into(),
        stage: stage.into(),
        content_type: record.content_type.clone(),
        max_file_size: u64::try_from(record.declared_size).unwrap_or(0),
        width: dim(record.width),
        height: dim(record.height),
        processed_width: dim(record.processed_width),
        processed_height: dim(record.processed_height),
        byte_size: record
            .byte_size
            .and_then(|b| u64::try_from(b).ok())
            .unwrap_or(0),
        sha256: record.sha256.clone().unwrap_or_default(),
        thumbhash: record.thumbhash.clone().unwrap_or_default(),
        files: record
            .files
            .iter()
            .flat_map(|files| files.iter())
            .map(|f| api::ImageFile {
                role: events::OutputRole::from(f.role).into(),
                content_type: f.content_type.clone(),
                width: f.width,
                height: f.height,
                byte_size: f.byte_size,
                url: String::new(),
            })
            .collect(),
        stripped_metadata: record
            .stripped_metadata
            .iter()
            .flatten()
            .filter_map(|name| name.parse::<MetadataKind>().ok())
            .map(|kind| events::MetadataKind::from(kind).into())
            .collect(),
        error_code: error_code(record.error_code.as_deref()).into(),
        error_message: record.error_message.clone().unwrap_or_default(),
        preview_url: String::new(),
        expire_time: Some(timestamp(record.expires_at)),
        create_time: Some(timestamp(record.created_at)),
        update_time: Some(timestamp(record.updated_at)),
    }
}

/// The API message of a route, without URLs.
pub fn route(record: &RouteRecord, live: &LiveStages) -> api::Route {
    api::Route {
        id: record.id.to_string(),
        owner: record.owner.clone(),
        name: record.name.clone(),
        status: match record.status {
            RouteStatus::Pending => api::RouteStatus::Pending,
            RouteStatus::Ready => api::RouteStatus::Ready,
            RouteStatus::Published => api::RouteStatus::Published,
        }
        .into(),
        waypoints: record
            .waypoints
            .iter()
            .map(|w| api::Waypoint {
                id: w.id.to_string(),
                route_id: record.id.to_string(),
                position: u32::try_from(w.position).unwrap_or(0),
                marker_x: w.marker_x,
                marker_y: w.marker_y,
                status: match w.status {
                    WaypointStatus::Pending => api::WaypointStatus::Pending,
                    WaypointStatus::Confirmed => api::WaypointStatus::Confirmed,
                    WaypointStatus::Failed => api::WaypointStatus::Failed,
                }
                .into(),
                image: Some(image(&w.image, live.of(w.image.id))),
            })
            .collect(),
        create_time: Some(timestamp(record.created_at)),
        update_time: Some(timestamp(record.updated_at)),
        publish_time: record.published_at.map(timestamp),
    }
}

pub fn error_code(code: Option<&str>) -> events::ErrorCode {
    code.and_then(|c| c.parse::<ErrorCode>().ok())
        .map_or(events::ErrorCode::Unspecified, events::ErrorCode::from)
}
