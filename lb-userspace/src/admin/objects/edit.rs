//! Edits of the config document (the file's JSON, as written): one function per operation
//! on virtual services, pools (and a pool's backends) and persistence profiles, with Avi's
//! rules: a pool or profile in use is not deleted (409 naming the services), system
//! profiles are not deleted (403), names do not change. Validation of the result as a whole
//! is the caller's ([`super::store`]); nothing here knows the running daemon.

use serde_json::{Map, Value};

use crate::config::{SYSTEM_PROFILES, is_system_profile, system_profile};

/// The kinds of object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    VirtualService,
    Pool,
    Profile,
}

impl Kind {
    /// Every kind, in the order the API documents them.
    pub const ALL: [Kind; 3] = [Kind::VirtualService, Kind::Pool, Kind::Profile];

    /// The path segment: `/api/v1/<segment>`.
    pub fn segment(self) -> &'static str {
        match self {
            Kind::VirtualService => "virtualservice",
            Kind::Pool => "pool",
            Kind::Profile => "profile",
        }
    }

    /// The config file's section holding the objects.
    pub fn section(self) -> &'static str {
        match self {
            Kind::VirtualService => "virtual_services",
            Kind::Pool => "pools",
            Kind::Profile => "persistence_profiles",
        }
    }

    pub fn noun(self) -> &'static str {
        match self {
            Kind::VirtualService => "virtual service",
            Kind::Pool => "pool",
            Kind::Profile => "persistence profile",
        }
    }

    pub fn from_segment(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.segment() == s)
    }

    /// The virtual service field that references objects of this kind.
    fn referenced_by(self) -> Option<&'static str> {
        match self {
            Kind::VirtualService => None,
            Kind::Pool => Some("pool"),
            Kind::Profile => Some("persistence"),
        }
    }
}

/// Why an edit is refused; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    /// 400: the request itself is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409: the name exists, or the object is in use by these services.
    #[error("{message}")]
    Conflict {
        message: String,
        virtual_services: Vec<String>,
    },
    /// 403: never allowed (deleting a system profile).
    #[error("{0}")]
    Forbidden(String),
}

/// The objects of `kind` in the document, in file order; profiles add the system ones
/// the file does not redefine.
pub fn list(doc: &Value, kind: Kind) -> Vec<Value> {
    let mut out: Vec<Value> = section(doc, kind).cloned().unwrap_or_default();
    if kind == Kind::Profile {
        let defined: Vec<String> = out.iter().filter_map(name_of).map(str::to_owned).collect();
        out.extend(
            SYSTEM_PROFILES
                .iter()
                .filter(|(n, _)| !defined.iter().any(|d| d == n))
                .filter_map(|(n, _)| system_profile(n)),
        );
    }
    out
}

/// One object by name.
pub fn get(doc: &Value, kind: Kind, name: &str) -> Result<Value, EditError> {
    match find(doc, kind, name) {
        Some(i) => Ok(section(doc, kind).expect("found in it")[i].clone()),
        None => builtin(kind, name).ok_or_else(|| not_found(kind, name)),
    }
}

/// Add a new object; its name must be free (a system profile's name is taken).
pub fn create(doc: &mut Value, kind: Kind, body: Value) -> Result<Value, EditError> {
    let name = body_name(&body, None)?;
    if find(doc, kind, &name).is_some() || builtin(kind, &name).is_some() {
        return Err(EditError::Conflict {
            message: format!("{} {name:?} exists", kind.noun()),
            virtual_services: Vec::new(),
        });
    }
    section_mut(doc, kind)?.push(body.clone());
    Ok(body)
}

/// Replace an object with `body` (whose `name`, if given, must be the same).
pub fn replace(doc: &mut Value, kind: Kind, name: &str, body: Value) -> Result<Value, EditError> {
    let mut body = body;
    body_name(&body, Some(name))?;
    if let Some(o) = body.as_object_mut() {
        o.insert("name".into(), Value::String(name.into()));
    }
    put(doc, kind, name, body)
}

/// Apply a JSON merge patch (RFC 7386) to an object.
pub fn patch(doc: &mut Value, kind: Kind, name: &str, patch: &Value) -> Result<Value, EditError> {
    if !patch.is_object() {
        return Err(EditError::BadRequest(
            "the body must be a JSON object (a merge patch)".into(),
        ));
    }
    let mut obj = get(doc, kind, name)?;
    merge(&mut obj, patch);
    body_name(&obj, Some(name))?;
    if let Some(o) = obj.as_object_mut() {
        o.insert("name".into(), Value::String(name.into()));
    }
    put(doc, kind, name, obj)
}

/// Delete an object nothing uses.
pub fn delete(doc: &mut Value, kind: Kind, name: &str) -> Result<Value, EditError> {
    if kind == Kind::Profile && is_system_profile(name) {
        return Err(EditError::Forbidden(format!(
            "{name:?} is a system profile: it can be used and edited, not deleted"
        )));
    }
    let i = find(doc, kind, name).ok_or_else(|| not_found(kind, name))?;
    let users = users(doc, kind, name);
    if !users.is_empty() {
        return Err(EditError::Conflict {
            message: format!(
                "{} {name:?} is in use by virtual services {}",
                kind.noun(),
                users.join(", ")
            ),
            virtual_services: users,
        });
    }
    let removed = section_mut(doc, kind)?.remove(i);
    Ok(removed)
}

/// Names of the virtual services that reference `name` (a pool or a profile).
pub fn users(doc: &Value, kind: Kind, name: &str) -> Vec<String> {
    let Some(field) = kind.referenced_by() else {
        return Vec::new();
    };
    section(doc, Kind::VirtualService)
        .into_iter()
        .flatten()
        .filter(|s| s.get(field).and_then(Value::as_str) == Some(name))
        .filter_map(name_of)
        .map(str::to_owned)
        .collect()
}

/// Add a backend to a pool; its name must be free in the pool.
pub fn add_backend(doc: &mut Value, pool: &str, body: Value) -> Result<Value, EditError> {
    let name = body_name(&body, None)?;
    let backends = backends_mut(doc, pool)?;
    if backends.iter().any(|b| name_of(b) == Some(&name)) {
        return Err(EditError::Conflict {
            message: format!("pool {pool:?} has a backend {name:?}"),
            virtual_services: Vec::new(),
        });
    }
    backends.push(body.clone());
    Ok(body)
}

pub fn get_backend(doc: &Value, pool: &str, name: &str) -> Result<Value, EditError> {
    let p = get(doc, Kind::Pool, pool)?;
    p.get("backends")
        .and_then(Value::as_array)
        .and_then(|bs| bs.iter().find(|b| name_of(b) == Some(name)))
        .cloned()
        .ok_or_else(|| backend_not_found(pool, name))
}

/// Merge-patch one backend of a pool (e.g. `{"admin_state": "draining"}`).
pub fn patch_backend(
    doc: &mut Value,
    pool: &str,
    name: &str,
    patch: &Value,
) -> Result<Value, EditError> {
    if !patch.is_object() {
        return Err(EditError::BadRequest(
            "the body must be a JSON object (a merge patch)".into(),
        ));
    }
    let b = backends_mut(doc, pool)?
        .iter_mut()
        .find(|b| name_of(b) == Some(name))
        .ok_or_else(|| backend_not_found(pool, name))?;
    let mut new = b.clone();
    merge(&mut new, patch);
    body_name(&new, Some(name))?;
    if let Some(o) = new.as_object_mut() {
        o.insert("name".into(), Value::String(name.into()));
    }
    *b = new.clone();
    Ok(new)
}

pub fn delete_backend(doc: &mut Value, pool: &str, name: &str) -> Result<Value, EditError> {
    let backends = backends_mut(doc, pool)?;
    let i = backends
        .iter()
        .position(|b| name_of(b) == Some(name))
        .ok_or_else(|| backend_not_found(pool, name))?;
    Ok(backends.remove(i))
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn put(doc: &mut Value, kind: Kind, name: &str, body: Value) -> Result<Value, EditError> {
    match find(doc, kind, name) {
        Some(i) => section_mut(doc, kind)?[i] = body.clone(),
        // A system profile edited for the first time: the file's copy replaces the built-in.
        None if builtin(kind, name).is_some() => section_mut(doc, kind)?.push(body.clone()),
        None => return Err(not_found(kind, name)),
    }
    Ok(body)
}

fn builtin(kind: Kind, name: &str) -> Option<Value> {
    (kind == Kind::Profile)
        .then(|| system_profile(name))
        .flatten()
}

/// The body's `name`: required and a string; equal to `expected` when given (an absent
/// name is then taken as `expected` by the caller).
fn body_name(body: &Value, expected: Option<&str>) -> Result<String, EditError> {
    let Some(o) = body.as_object() else {
        return Err(EditError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    };
    match (o.get("name"), expected) {
        (Some(Value::String(n)), Some(e)) if n != e => Err(EditError::BadRequest(format!(
            "name: {n:?} differs from {e:?} in the path (objects cannot be renamed: create \
             the new one, move its users, delete the old one)"
        ))),
        (Some(Value::String(n)), _) => Ok(n.clone()),
        (None, Some(e)) => Ok(e.to_string()),
        (None, None) => Err(EditError::BadRequest("name: required".into())),
        (Some(_), _) => Err(EditError::BadRequest("name: must be a string".into())),
    }
}

fn name_of(v: &Value) -> Option<&str> {
    v.get("name").and_then(Value::as_str)
}

fn section(doc: &Value, kind: Kind) -> Option<&Vec<Value>> {
    doc.get(kind.section()).and_then(Value::as_array)
}

fn section_mut(doc: &mut Value, kind: Kind) -> Result<&mut Vec<Value>, EditError> {
    let root = doc
        .as_object_mut()
        .ok_or_else(|| EditError::BadRequest("the config file is not a JSON object".into()))?;
    let s = root
        .entry(kind.section())
        .or_insert_with(|| Value::Array(Vec::new()));
    s.as_array_mut().ok_or_else(|| {
        EditError::BadRequest(format!(
            "{} in the config file is not a list",
            kind.section()
        ))
    })
}

fn find(doc: &Value, kind: Kind, name: &str) -> Option<usize> {
    section(doc, kind)?
        .iter()
        .position(|o| name_of(o) == Some(name))
}

fn backends_mut<'a>(doc: &'a mut Value, pool: &str) -> Result<&'a mut Vec<Value>, EditError> {
    let i = find(doc, Kind::Pool, pool).ok_or_else(|| not_found(Kind::Pool, pool))?;
    let p = section_mut(doc, Kind::Pool)?[i]
        .as_object_mut()
        .ok_or_else(|| EditError::BadRequest(format!("pool {pool:?} is not a JSON object")))?;
    p.entry("backends")
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()
        .ok_or_else(|| EditError::BadRequest(format!("pool {pool:?}: backends is not a list")))
}

fn not_found(kind: Kind, name: &str) -> EditError {
    EditError::NotFound(format!("no {} {name:?}", kind.noun()))
}

fn backend_not_found(pool: &str, name: &str) -> EditError {
    EditError::NotFound(format!("pool {pool:?} has no backend {name:?}"))
}
