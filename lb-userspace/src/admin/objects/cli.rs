//! `tether vs|pool|profile ...`: the object API from the command line. Each command is one
//! request (an edit of one backend is a `PATCH` of that backend, so concurrent operators
//! lose no update); objects print as the config file's JSON, lists as one line each.

use std::{fmt::Write as _, path::PathBuf};

use clap::{Args, Subcommand};
use serde_json::{Map, Value, json};

use crate::admin::cli::{CliError, Endpoint, request_with_body};

/// What a command needs besides the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ObjectCliError {
    #[error(transparent)]
    Cli(#[from] CliError),
    /// The API refused: its status and message (and the services using the object).
    #[error("{message} (HTTP {status})")]
    Refused { status: u16, message: String },
    #[error("{0}")]
    Usage(String),
    #[error("reading {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, ObjectCliError>;

/// Ways to give a whole object or a patch.
#[derive(Debug, Clone, Args)]
pub struct JsonInput {
    /// The object (create) or a JSON merge patch (edit), inline.
    #[arg(long, conflicts_with = "file")]
    pub json: Option<String>,
    /// The same, from a file (`-` for stdin).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Set one field: `KEY=VALUE`, VALUE read as JSON when it parses (numbers, true,
    /// objects), else as a string; repeatable, applied after --json/--file.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum VsCmd {
    /// One line per virtual service: name, address, mode, pool, persistence.
    List,
    /// A virtual service as JSON.
    Show { name: String },
    /// Create a virtual service.
    Create {
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        vip: Option<String>,
        #[arg(long)]
        port: Option<u16>,
        /// tcp or udp (default tcp).
        #[arg(long)]
        protocol: Option<String>,
        /// l4-dsr or l7.
        #[arg(long)]
        mode: Option<String>,
        #[arg(long)]
        pool: Option<String>,
        /// A persistence profile name.
        #[arg(long)]
        persistence: Option<String>,
        #[command(flatten)]
        input: JsonInput,
    },
    /// Change a virtual service (a merge patch of the given fields).
    Edit {
        name: String,
        #[arg(long)]
        pool: Option<String>,
        #[arg(long, conflicts_with = "no_persistence")]
        persistence: Option<String>,
        /// Remove the service's persistence.
        #[arg(long)]
        no_persistence: bool,
        #[command(flatten)]
        input: JsonInput,
    },
    /// Delete a virtual service.
    Delete { name: String },
}

#[derive(Debug, Clone, Subcommand)]
pub enum PoolCmd {
    /// One line per pool: name, backends with their state.
    List,
    /// A pool as JSON.
    Show { name: String },
    /// Create a pool; `--add-backend NAME=ADDRESS[:PORT]` for each backend.
    Create {
        #[arg(long)]
        name: Option<String>,
        #[arg(long = "add-backend", value_name = "NAME=ADDRESS[:PORT]")]
        add_backend: Vec<String>,
        #[command(flatten)]
        input: JsonInput,
    },
    /// Change a pool: one backend (`--backend B --admin-state draining --weight 2`), add or
    /// remove backends, or patch the pool's own fields.
    Edit {
        name: String,
        /// The backend that --admin-state, --weight and --set apply to.
        #[arg(long)]
        backend: Option<String>,
        /// enabled, draining or disabled.
        #[arg(long, requires = "backend")]
        admin_state: Option<String>,
        #[arg(long, requires = "backend")]
        weight: Option<u32>,
        #[arg(long = "add-backend", value_name = "NAME=ADDRESS[:PORT]")]
        add_backend: Vec<String>,
        #[arg(long = "remove-backend", value_name = "NAME")]
        remove_backend: Vec<String>,
        #[command(flatten)]
        input: JsonInput,
    },
    /// Delete a pool no virtual service uses.
    Delete { name: String },
}

#[derive(Debug, Clone, Subcommand)]
pub enum ProfileCmd {
    /// One line per persistence profile (system profiles included).
    List,
    /// A profile as JSON.
    Show { name: String },
    /// Create a profile: `--type http-cookie --name web-ck --set cookie_name=SRV`.
    Create {
        #[arg(long)]
        name: Option<String>,
        #[arg(long = "type")]
        kind: Option<String>,
        #[arg(long)]
        timeout_s: Option<u32>,
        #[command(flatten)]
        input: JsonInput,
    },
    /// Change a profile (system profiles too).
    Edit {
        name: String,
        #[arg(long = "type")]
        kind: Option<String>,
        #[arg(long)]
        timeout_s: Option<u32>,
        #[command(flatten)]
        input: JsonInput,
    },
    /// Delete a profile no virtual service uses (system profiles cannot be deleted).
    Delete { name: String },
}

const VS: &str = "/api/v1/virtualservice";
const POOL: &str = "/api/v1/pool";
const PROFILE: &str = "/api/v1/profile";

pub fn vs(admin: &Endpoint, cmd: VsCmd) -> Result<String> {
    match cmd {
        VsCmd::List => Ok(render_services(&call(admin, "GET", VS, None)?)),
        VsCmd::Show { name } => show(admin, &format!("{VS}/{name}")),
        VsCmd::Create {
            name,
            vip,
            port,
            protocol,
            mode,
            pool,
            persistence,
            input,
        } => {
            let mut o = input.object()?;
            put_opt(&mut o, "name", name.map(Value::from));
            put_opt(&mut o, "vip", vip.map(Value::from));
            put_opt(&mut o, "port", port.map(Value::from));
            put_opt(&mut o, "protocol", protocol.map(Value::from));
            if !o.contains_key("protocol") {
                o.insert("protocol".into(), "tcp".into());
            }
            put_opt(&mut o, "mode", mode.map(Value::from));
            put_opt(&mut o, "pool", pool.map(Value::from));
            put_opt(&mut o, "persistence", persistence.map(Value::from));
            created(admin, VS, "virtual service", o)
        }
        VsCmd::Edit {
            name,
            pool,
            persistence,
            no_persistence,
            input,
        } => {
            let mut o = input.object()?;
            put_opt(&mut o, "pool", pool.map(Value::from));
            put_opt(&mut o, "persistence", persistence.map(Value::from));
            if no_persistence {
                o.insert("persistence".into(), Value::Null);
            }
            edited(
                admin,
                &format!("{VS}/{name}"),
                &format!("virtual service {name}"),
                o,
            )
        }
        VsCmd::Delete { name } => deleted(admin, &format!("{VS}/{name}"), "virtual service"),
    }
}

pub fn pool(admin: &Endpoint, cmd: PoolCmd) -> Result<String> {
    match cmd {
        PoolCmd::List => Ok(render_pools(&call(admin, "GET", POOL, None)?)),
        PoolCmd::Show { name } => show(admin, &format!("{POOL}/{name}")),
        PoolCmd::Create {
            name,
            add_backend,
            input,
        } => {
            let mut o = input.object()?;
            put_opt(&mut o, "name", name.map(Value::from));
            if !add_backend.is_empty() {
                let bs: Vec<Value> = add_backend
                    .iter()
                    .map(|b| backend_spec(b))
                    .collect::<Result<_>>()?;
                o.insert("backends".into(), Value::Array(bs));
            }
            created(admin, POOL, "pool", o)
        }
        PoolCmd::Edit {
            name,
            backend,
            admin_state,
            weight,
            add_backend,
            remove_backend,
            input,
        } => {
            let mut out = String::new();
            for b in &add_backend {
                let body = backend_spec(b)?;
                call(
                    admin,
                    "POST",
                    &format!("{POOL}/{name}/backend"),
                    Some(&body),
                )?;
                let _ = writeln!(out, "pool {name}: added backend {}", body["name"]);
            }
            for b in &remove_backend {
                call(admin, "DELETE", &format!("{POOL}/{name}/backend/{b}"), None)?;
                let _ = writeln!(out, "pool {name}: removed backend {b:?}");
            }
            let mut o = input.object()?;
            match backend {
                Some(b) => {
                    put_opt(&mut o, "admin_state", admin_state.map(Value::from));
                    put_opt(&mut o, "weight", weight.map(Value::from));
                    out += &edited(
                        admin,
                        &format!("{POOL}/{name}/backend/{b}"),
                        &format!("pool {name} backend {b}"),
                        o,
                    )?;
                }
                None if !o.is_empty() => {
                    out += &edited(admin, &format!("{POOL}/{name}"), &format!("pool {name}"), o)?;
                }
                None if out.is_empty() => {
                    return Err(ObjectCliError::Usage(
                        "nothing to change: give --backend with --admin-state/--weight/--set, \
                         --add-backend, --remove-backend, --set or --json"
                            .into(),
                    ));
                }
                None => {}
            }
            Ok(out)
        }
        PoolCmd::Delete { name } => deleted(admin, &format!("{POOL}/{name}"), "pool"),
    }
}

pub fn profile(admin: &Endpoint, cmd: ProfileCmd) -> Result<String> {
    match cmd {
        ProfileCmd::List => Ok(render_profiles(&call(admin, "GET", PROFILE, None)?)),
        ProfileCmd::Show { name } => show(admin, &format!("{PROFILE}/{name}")),
        ProfileCmd::Create {
            name,
            kind,
            timeout_s,
            input,
        } => {
            let mut o = input.object()?;
            put_opt(&mut o, "name", name.map(Value::from));
            put_opt(&mut o, "type", kind.map(Value::from));
            put_opt(&mut o, "timeout_s", timeout_s.map(Value::from));
            created(admin, PROFILE, "persistence profile", o)
        }
        ProfileCmd::Edit {
            name,
            kind,
            timeout_s,
            input,
        } => {
            let mut o = input.object()?;
            put_opt(&mut o, "type", kind.map(Value::from));
            put_opt(&mut o, "timeout_s", timeout_s.map(Value::from));
            edited(
                admin,
                &format!("{PROFILE}/{name}"),
                &format!("persistence profile {name}"),
                o,
            )
        }
        ProfileCmd::Delete { name } => {
            deleted(admin, &format!("{PROFILE}/{name}"), "persistence profile")
        }
    }
}

impl JsonInput {
    /// The object given by --json or --file, with --set applied.
    pub fn object(&self) -> Result<Map<String, Value>> {
        let text = match (&self.json, &self.file) {
            (Some(j), _) => Some(j.clone()),
            (None, Some(p)) if p.as_os_str() == "-" => {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|source| {
                    ObjectCliError::File {
                        path: p.clone(),
                        source,
                    }
                })?;
                Some(s)
            }
            (None, Some(p)) => {
                Some(
                    std::fs::read_to_string(p).map_err(|source| ObjectCliError::File {
                        path: p.clone(),
                        source,
                    })?,
                )
            }
            (None, None) => None,
        };
        let mut o = match text {
            Some(t) => match serde_json::from_str(&t) {
                Ok(Value::Object(o)) => o,
                Ok(_) => {
                    return Err(ObjectCliError::Usage(
                        "--json/--file: not a JSON object".into(),
                    ));
                }
                Err(e) => return Err(ObjectCliError::Usage(format!("--json/--file: {e}"))),
            },
            None => Map::new(),
        };
        for s in &self.set {
            let Some((k, v)) = s.split_once('=') else {
                return Err(ObjectCliError::Usage(format!("--set {s:?}: use KEY=VALUE")));
            };
            let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
            o.insert(k.to_string(), v);
        }
        Ok(o)
    }
}

/// `NAME=ADDRESS[:PORT]` (an IPv6 address with a port in brackets: `b1=[2001:db8::1]:80`).
pub fn backend_spec(s: &str) -> Result<Value> {
    let bad = || ObjectCliError::Usage(format!("backend {s:?}: use NAME=ADDRESS[:PORT]"));
    let (name, addr) = s.split_once('=').ok_or_else(bad)?;
    if name.is_empty() || addr.is_empty() {
        return Err(bad());
    }
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        return Ok(json!({"name": name, "address": sa.ip().to_string(), "port": sa.port()}));
    }
    Ok(json!({"name": name, "address": addr}))
}

fn put_opt(o: &mut Map<String, Value>, k: &str, v: Option<Value>) {
    if let Some(v) = v {
        o.insert(k.to_string(), v);
    }
}

/// One request; a non-2xx answer becomes [`ObjectCliError::Refused`] with the API's message.
fn call(admin: &Endpoint, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let bytes = body.map(|b| serde_json::to_vec(b).expect("a JSON value encodes"));
    let r = request_with_body(admin, method, path, bytes.as_deref())?;
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|_| json!({"error": String::from_utf8_lossy(&r.body).trim().to_string()}));
    if !(200..300).contains(&r.status) {
        let mut message = v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("refused")
            .to_string();
        if let Some(vs) = v.get("virtual_services").and_then(Value::as_array) {
            let names: Vec<&str> = vs.iter().filter_map(Value::as_str).collect();
            let _ = write!(message, " [virtual services: {}]", names.join(", "));
        }
        return Err(ObjectCliError::Refused {
            status: r.status,
            message,
        });
    }
    Ok(v)
}

fn show(admin: &Endpoint, path: &str) -> Result<String> {
    let v = call(admin, "GET", path, None)?;
    Ok(format!(
        "{}\n",
        serde_json::to_string_pretty(&v).unwrap_or_default()
    ))
}

fn created(admin: &Endpoint, path: &str, noun: &str, o: Map<String, Value>) -> Result<String> {
    let v = call(admin, "POST", path, Some(&Value::Object(o)))?;
    Ok(format!(
        "created {noun} {}\n",
        v.get("name").and_then(Value::as_str).unwrap_or("?")
    ))
}

fn edited(admin: &Endpoint, path: &str, what: &str, o: Map<String, Value>) -> Result<String> {
    if o.is_empty() {
        return Err(ObjectCliError::Usage(format!(
            "nothing to change in {what}: give the fields to set (--set KEY=VALUE, --json)"
        )));
    }
    let v = call(admin, "PATCH", path, Some(&Value::Object(o)))?;
    Ok(format!(
        "{what}: {}\n",
        serde_json::to_string(&v).unwrap_or_default()
    ))
}

fn deleted(admin: &Endpoint, path: &str, noun: &str) -> Result<String> {
    let v = call(admin, "DELETE", path, None)?;
    Ok(format!(
        "deleted {noun} {}\n",
        v.get("deleted").and_then(Value::as_str).unwrap_or("?")
    ))
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("-")
}

pub fn render_services(v: &Value) -> String {
    let mut out = String::new();
    for o in v.as_array().into_iter().flatten() {
        let port = o.get("port").map_or("-".to_string(), Value::to_string);
        let _ = writeln!(
            out,
            "{:<20} {}:{}/{} {:<7} pool {:<16} persistence {}",
            s(o, "name"),
            s(o, "vip"),
            port,
            s(o, "protocol"),
            s(o, "mode"),
            s(o, "pool"),
            s(o, "persistence"),
        );
    }
    out
}

pub fn render_pools(v: &Value) -> String {
    let mut out = String::new();
    for o in v.as_array().into_iter().flatten() {
        let backends: Vec<String> = o
            .get("backends")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|b| {
                let state = b
                    .get("admin_state")
                    .and_then(Value::as_str)
                    .unwrap_or("enabled");
                format!("{}={} ({state})", s(b, "name"), s(b, "address"))
            })
            .collect();
        let _ = writeln!(out, "{:<20} {}", s(o, "name"), backends.join(", "));
    }
    out
}

pub fn render_profiles(v: &Value) -> String {
    let mut out = String::new();
    for o in v.as_array().into_iter().flatten() {
        let name = s(o, "name");
        let system = if crate::config::is_system_profile(name) {
            " (system)"
        } else {
            ""
        };
        let timeout = o
            .get("timeout_s")
            .map_or("default".to_string(), Value::to_string);
        let _ = writeln!(
            out,
            "{name:<36} {:<16} timeout_s {timeout}{system}",
            s(o, "type")
        );
    }
    out
}
