//! Object management over the admin API, Avi's model on tether's config: virtual services,
//! pools (with their backends and health monitor) and persistence profiles, created, listed,
//! shown, edited and deleted as JSON in the config file's own shape.
//!
//! | Route | Methods |
//! |---|---|
//! | `/api/v1/{virtualservice,pool,profile}` | `GET` (a JSON array), `POST` (create: 201) |
//! | `/api/v1/<kind>/<name>` | `GET`, `PUT` (replace), `PATCH` (JSON merge patch), `DELETE` |
//! | `/api/v1/pool/<name>/backend` | `POST` (add a backend) |
//! | `/api/v1/pool/<name>/backend/<backend>` | `GET`, `PATCH` (e.g. `{"admin_state": "draining"}`), `DELETE` |
//!
//! Errors are JSON: `{"error": text}`, plus `"field"` and `"reason"` for a change the
//! config validator refuses (422) and `"virtual_services"` for an object in use (409).
//! Every change is validated as a whole, applied live and written to the config file
//! ([`store`]).

pub mod cli;
pub mod edit;
pub mod store;

use hyper::{Method, Response, StatusCode};
use serde_json::{Value, json};

use self::{
    edit::{EditError, Kind},
    store::{Store, StoreError},
};
use super::{Body, respond};

/// Largest request body taken (a pool of 4096 backends is about 500 KiB).
pub const MAX_BODY: usize = 1 << 20;

/// Answer one object request; `params` are the route's `{name}` and `{backend}` values.
pub async fn handle(
    store: Option<&Store>,
    method: &Method,
    path: &str,
    params: &[&str],
    body: &[u8],
) -> Response<Body> {
    let Some(store) = store else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "object management is not available on this daemon"}),
        );
    };
    let kind = path
        .strip_prefix("/api/v1/")
        .and_then(|r| r.split('/').next())
        .and_then(Kind::from_segment);
    let Some(kind) = kind else {
        return error(
            StatusCode::NOT_FOUND,
            json!({"error": "no such object kind"}),
        );
    };
    let body = if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        match serde_json::from_slice::<Value>(body) {
            Ok(v) => v,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("the body is not JSON: {e}")}),
                );
            }
        }
    } else {
        Value::Null
    };
    let r = match (method, params) {
        (&Method::GET, []) => read(store, |d| Ok(Value::Array(edit::list(d, kind)))).await,
        (&Method::GET, [name]) => read(store, |d| edit::get(d, kind, name)).await,
        (&Method::GET, [pool, b]) => read(store, |d| edit::get_backend(d, pool, b)).await,
        (&Method::POST, []) => store
            .change(|d| edit::create(d, kind, body))
            .await
            .map(|a| (StatusCode::CREATED, a.object)),
        (&Method::POST, [pool]) => store
            .change(|d| edit::add_backend(d, pool, body))
            .await
            .map(|a| (StatusCode::CREATED, a.object)),
        (&Method::PUT, [name]) => {
            changed(store.change(|d| edit::replace(d, kind, name, body))).await
        }
        (&Method::PATCH, [name]) => {
            changed(store.change(|d| edit::patch(d, kind, name, &body))).await
        }
        (&Method::PATCH, [pool, b]) => {
            changed(store.change(|d| edit::patch_backend(d, pool, b, &body))).await
        }
        (&Method::DELETE, [name]) => store
            .change(|d| edit::delete(d, kind, name))
            .await
            .map(|_| (StatusCode::OK, json!({"deleted": name}))),
        (&Method::DELETE, [pool, b]) => store
            .change(|d| edit::delete_backend(d, pool, b))
            .await
            .map(|_| (StatusCode::OK, json!({"deleted": b, "pool": pool}))),
        _ => Err(StoreError::Edit(EditError::BadRequest(format!(
            "{method} {path} is not an object operation"
        )))),
    };
    match r {
        Ok((status, v)) => {
            if *method != Method::GET {
                log::info!("admin API: {method} {path}: applied");
            }
            let mut b = serde_json::to_vec_pretty(&v).unwrap_or_default();
            b.push(b'\n');
            respond(status, "application/json", b)
        }
        Err(e) => {
            let (status, body) = error_body(&e);
            if *method != Method::GET {
                log::warn!("admin API: {method} {path}: refused: {e}");
            }
            error(status, body)
        }
    }
}

async fn read(
    store: &Store,
    f: impl FnOnce(&Value) -> Result<Value, EditError>,
) -> Result<(StatusCode, Value), StoreError> {
    let doc = store.read().await?;
    Ok((StatusCode::OK, f(&doc)?))
}

async fn changed(
    f: impl std::future::Future<Output = Result<store::Applied, StoreError>>,
) -> Result<(StatusCode, Value), StoreError> {
    f.await.map(|a| (StatusCode::OK, a.object))
}

/// The status and JSON body of a refusal.
pub fn error_body(e: &StoreError) -> (StatusCode, Value) {
    match e {
        StoreError::Edit(EditError::BadRequest(m)) => {
            (StatusCode::BAD_REQUEST, json!({"error": m}))
        }
        StoreError::Edit(EditError::NotFound(m)) => (StatusCode::NOT_FOUND, json!({"error": m})),
        StoreError::Edit(EditError::Forbidden(m)) => (StatusCode::FORBIDDEN, json!({"error": m})),
        StoreError::Edit(EditError::Conflict {
            message,
            virtual_services,
        }) if virtual_services.is_empty() => (StatusCode::CONFLICT, json!({"error": message})),
        StoreError::Edit(EditError::Conflict {
            message,
            virtual_services,
        }) => (
            StatusCode::CONFLICT,
            json!({"error": message, "virtual_services": virtual_services}),
        ),
        StoreError::Invalid(c) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error": c.to_string(), "field": c.path, "reason": c.reason}),
        ),
        StoreError::NotApplied(_) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error": e.to_string()}),
        ),
        StoreError::Stale => (StatusCode::CONFLICT, json!({"error": e.to_string()})),
        StoreError::File(m) => (StatusCode::INTERNAL_SERVER_ERROR, json!({"error": m})),
        StoreError::Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": e.to_string()}),
        ),
    }
}

fn error(status: StatusCode, body: Value) -> Response<Body> {
    let mut b = serde_json::to_vec(&body).unwrap_or_default();
    b.push(b'\n');
    respond(status, "application/json", b)
}

#[cfg(test)]
mod tests;
