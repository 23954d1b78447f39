//! The object API against a real config file and a stand-in control loop that applies by
//! writing the file (as the daemon's does once everything is prepared).

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use http_body_util::BodyExt as _;
use hyper::Method;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{
    edit,
    store::{ApplyRequest, Refused, Store, write_atomic},
};
use crate::{
    admin::routes,
    config::{Config, SYSTEM_PROFILES},
};

const BASE: &str = r#"{
  "interface": "lo",
  "virtual_services": [
    {"name": "web", "vip": "192.0.2.10", "port": 80, "protocol": "tcp", "mode": "l4-dsr",
     "pool": "web", "persistence": "src"},
    {"name": "web-alt", "vip": "192.0.2.10", "port": 8080, "protocol": "tcp", "mode": "l4-dsr",
     "pool": "web", "persistence": "src"},
    {"name": "api", "vip": "192.0.2.11", "port": 80, "protocol": "tcp", "mode": "l7",
     "pool": "api", "persistence": "System-Persistence-Http-Cookie"}
  ],
  "pools": [
    {"name": "web", "backends": [{"name": "b1", "address": "10.0.0.11"}]},
    {"name": "api", "backends": [{"name": "a1", "address": "10.0.0.21", "port": 8080}]},
    {"name": "spare", "backends": [{"name": "s1", "address": "10.0.0.31"}]}
  ],
  "persistence_profiles": [
    {"name": "src", "type": "client-ip", "timeout_s": 1800}
  ]
}
"#;

struct Fixture {
    dir: PathBuf,
    path: PathBuf,
    store: Arc<Store>,
    applied: Arc<AtomicUsize>,
    refuse: Arc<AtomicBool>,
    /// The stand-in control loop edits the file "by hand" before it looks at a change.
    tamper: Arc<AtomicBool>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(name: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("tether-objects-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test dir");
    let path = dir.join("tether.json");
    std::fs::write(&path, BASE).expect("config file");
    Config::parse(BASE).expect("the base config is valid");
    let (tx, mut rx) = mpsc::channel::<ApplyRequest>(4);
    let applied = Arc::new(AtomicUsize::new(0));
    let refuse = Arc::new(AtomicBool::new(false));
    let tamper = Arc::new(AtomicBool::new(false));
    let (a, r, t, p) = (
        applied.clone(),
        refuse.clone(),
        tamper.clone(),
        path.clone(),
    );
    tokio::spawn(async move {
        while let Some(req) = rx.recv().await {
            if r.load(Ordering::SeqCst) {
                let _ = req
                    .reply
                    .send(Err(Refused::Failed("backend b9: no route (test)".into())));
                continue;
            }
            if t.load(Ordering::SeqCst) {
                let mut text = std::fs::read_to_string(&p).expect("read");
                text.push(' ');
                std::fs::write(&p, text).expect("hand edit");
            }
            if !req.base_is_current(&p) {
                let _ = req.reply.send(Err(Refused::Stale));
                continue;
            }
            write_atomic(&p, &req.text).expect("writing the config");
            let n = a.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = req.reply.send(Ok(n as u64));
        }
    });
    Fixture {
        store: Arc::new(Store::new(path.clone(), tx)),
        dir,
        path,
        applied,
        refuse,
        tamper,
    }
}

/// One request through the route table and the object handler: status and JSON body.
async fn call(store: &Store, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let (route, params) = routes::find(path).unwrap_or_else(|| panic!("no route for {path}"));
    assert!(
        route.methods.contains(&method.as_str()),
        "{path} does not take {method}"
    );
    let body = body
        .map(|b| serde_json::to_vec(&b).expect("encode"))
        .unwrap_or_default();
    let r = super::handle(Some(store), &method, path, &params, &body).await;
    let status = r.status().as_u16();
    let bytes = r.into_body().collect().await.expect("body").to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {bytes:?}"));
    (status, v)
}

fn file(f: &Fixture) -> Value {
    let text = std::fs::read_to_string(&f.path).expect("config file");
    Config::parse(&text).expect("the written file loads");
    serde_json::from_str(&text).expect("JSON")
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|o| o["name"].as_str().expect("name").to_string())
        .collect()
}

#[tokio::test]
async fn virtual_service_round_trip() {
    let f = fixture("vs");
    let s = &f.store;
    let vs = json!({"name": "new", "vip": "192.0.2.12", "port": 443, "protocol": "tcp",
                    "mode": "l4-dsr", "pool": "spare"});
    assert_eq!(
        call(s, Method::POST, "/api/v1/virtualservice", Some(vs.clone())).await,
        (201, vs.clone())
    );
    let (st, list) = call(s, Method::GET, "/api/v1/virtualservice", None).await;
    assert_eq!(
        (st, names(&list)),
        (
            200,
            vec!["web".into(), "web-alt".into(), "api".into(), "new".into()]
        )
    );
    assert_eq!(
        call(s, Method::GET, "/api/v1/virtualservice/new", None).await,
        (200, vs.clone())
    );
    // PATCH: merge, the rest kept.
    let (st, v) = call(
        s,
        Method::PATCH,
        "/api/v1/virtualservice/new",
        Some(json!({"persistence": "src", "port": 444})),
    )
    .await;
    assert_eq!(
        (st, &v["port"], &v["persistence"], &v["pool"]),
        (200, &json!(444), &json!("src"), &json!("spare"))
    );
    // PUT replaces the whole object (the name may be left out).
    let put = json!({"vip": "192.0.2.13", "port": 80, "protocol": "udp", "mode": "l4-dsr", "pool": "spare"});
    let (st, v) = call(s, Method::PUT, "/api/v1/virtualservice/new", Some(put)).await;
    assert_eq!(
        (st, v.get("persistence"), &v["name"]),
        (200, None, &json!("new"))
    );
    assert_eq!(
        file(&f)["virtual_services"][3],
        v,
        "the file holds what the API answered"
    );
    assert_eq!(
        call(s, Method::DELETE, "/api/v1/virtualservice/new", None).await,
        (200, json!({"deleted": "new"}))
    );
    assert_eq!(
        call(s, Method::GET, "/api/v1/virtualservice/new", None)
            .await
            .0,
        404
    );
    assert_eq!(
        names(&file(&f)["virtual_services"]),
        vec!["web", "web-alt", "api"]
    );
    assert_eq!(
        f.applied.load(Ordering::SeqCst),
        4,
        "each change applied once"
    );
}

#[tokio::test]
async fn pool_and_backend_round_trip() {
    let f = fixture("pool");
    let s = &f.store;
    let pool = json!({"name": "p2", "backends": [{"name": "x1", "address": "10.0.1.1"}],
                      "health_monitor": {"type": "tcp", "port": 80, "interval_ms": 3000}});
    assert_eq!(
        call(s, Method::POST, "/api/v1/pool", Some(pool.clone())).await,
        (201, pool.clone())
    );
    assert_eq!(
        call(s, Method::POST, "/api/v1/pool", Some(pool)).await.0,
        409,
        "a name is taken once"
    );
    let b2 = json!({"name": "x2", "address": "10.0.1.2", "weight": 3});
    assert_eq!(
        call(s, Method::POST, "/api/v1/pool/p2/backend", Some(b2.clone())).await,
        (201, b2)
    );
    let (st, b) = call(
        s,
        Method::PATCH,
        "/api/v1/pool/p2/backend/x2",
        Some(json!({"admin_state": "draining"})),
    )
    .await;
    assert_eq!(
        (st, &b["admin_state"], &b["weight"]),
        (200, &json!("draining"), &json!(3))
    );
    assert_eq!(
        call(s, Method::GET, "/api/v1/pool/p2/backend/x2", None)
            .await
            .1,
        b
    );
    let (_, p) = call(s, Method::GET, "/api/v1/pool/p2", None).await;
    assert_eq!(names(&p["backends"]), vec!["x1", "x2"]);
    assert_eq!(p["health_monitor"]["interval_ms"], json!(3000));
    // The monitor is edited as part of the pool; null removes it.
    let (_, p) = call(
        s,
        Method::PATCH,
        "/api/v1/pool/p2",
        Some(json!({"health_monitor": {"rise": 3}})),
    )
    .await;
    assert_eq!(
        p["health_monitor"],
        json!({"type": "tcp", "port": 80, "interval_ms": 3000, "rise": 3})
    );
    let (_, p) = call(
        s,
        Method::PATCH,
        "/api/v1/pool/p2",
        Some(json!({"health_monitor": null})),
    )
    .await;
    assert!(p.get("health_monitor").is_none(), "{p}");
    assert_eq!(
        call(s, Method::DELETE, "/api/v1/pool/p2/backend/x1", None)
            .await
            .0,
        200
    );
    assert_eq!(names(&file(&f)["pools"][3]["backends"]), vec!["x2"]);
    assert_eq!(
        call(s, Method::DELETE, "/api/v1/pool/p2/backend/x1", None)
            .await
            .0,
        404
    );
    assert_eq!(
        call(s, Method::DELETE, "/api/v1/pool/p2", None).await.0,
        200
    );
    assert_eq!(names(&file(&f)["pools"]), vec!["web", "api", "spare"]);
}

#[tokio::test]
async fn profile_round_trip() {
    let f = fixture("profile");
    let s = &f.store;
    let p = json!({"name": "web-ck", "type": "http-cookie", "cookie_name": "SRV", "max_lifetime_min": 60});
    assert_eq!(
        call(s, Method::POST, "/api/v1/profile", Some(p.clone())).await,
        (201, p)
    );
    let (_, v) = call(
        s,
        Method::PATCH,
        "/api/v1/profile/web-ck",
        Some(json!({"max_lifetime_min": 90})),
    )
    .await;
    assert_eq!(
        (&v["max_lifetime_min"], &v["cookie_name"]),
        (&json!(90), &json!("SRV"))
    );
    // The type changes with a PUT of the whole profile.
    let put = json!({"type": "app-cookie", "cookie_name": "JSESSIONID"});
    let (st, v) = call(s, Method::PUT, "/api/v1/profile/web-ck", Some(put)).await;
    assert_eq!((st, &v["type"]), (200, &json!("app-cookie")));
    let (_, list) = call(s, Method::GET, "/api/v1/profile", None).await;
    let listed = names(&list);
    assert_eq!(&listed[..2], &["src".to_string(), "web-ck".to_string()]);
    assert_eq!(
        listed.len(),
        2 + SYSTEM_PROFILES.len(),
        "the system profiles are listed: {listed:?}"
    );
    assert_eq!(
        call(s, Method::DELETE, "/api/v1/profile/web-ck", None)
            .await
            .0,
        200
    );
    assert_eq!(names(&file(&f)["persistence_profiles"]), vec!["src"]);
}

#[tokio::test]
async fn in_use_delete_names_every_service() {
    let f = fixture("inuse");
    let before = std::fs::read(&f.path).expect("file");
    let (st, v) = call(&f.store, Method::DELETE, "/api/v1/pool/web", None).await;
    assert_eq!(
        (st, &v["virtual_services"]),
        (409, &json!(["web", "web-alt"])),
        "{v}"
    );
    let (st, v) = call(&f.store, Method::DELETE, "/api/v1/profile/src", None).await;
    assert_eq!(
        (st, &v["virtual_services"]),
        (409, &json!(["web", "web-alt"])),
        "{v}"
    );
    assert!(
        v["error"].as_str().expect("error").contains("web, web-alt"),
        "{v}"
    );
    assert_eq!(
        std::fs::read(&f.path).expect("file"),
        before,
        "nothing written"
    );
    assert_eq!(f.applied.load(Ordering::SeqCst), 0);
    // Once no service uses it, it goes.
    assert_eq!(
        call(&f.store, Method::DELETE, "/api/v1/pool/spare", None)
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn system_profiles_are_usable_editable_not_deletable() {
    let f = fixture("system");
    let s = &f.store;
    for (name, kind) in SYSTEM_PROFILES {
        let (st, v) = call(s, Method::GET, &format!("/api/v1/profile/{name}"), None).await;
        assert_eq!((st, v), (200, json!({"name": name, "type": kind})));
        let (st, v) = call(s, Method::DELETE, &format!("/api/v1/profile/{name}"), None).await;
        assert_eq!(st, 403, "{name}: {v}");
        assert!(
            v["error"]
                .as_str()
                .expect("error")
                .contains("system profile"),
            "{v}"
        );
    }
    // Used by "api" without being in the file; an edit puts the edited copy in the file.
    let path = "/api/v1/profile/System-Persistence-Http-Cookie";
    let (st, v) = call(
        s,
        Method::PATCH,
        path,
        Some(json!({"session_max_age_s": 3600})),
    )
    .await;
    assert_eq!((st, &v["session_max_age_s"]), (200, &json!(3600)), "{v}");
    let profiles = file(&f)["persistence_profiles"].clone();
    assert_eq!(
        profiles[1],
        json!({"name": "System-Persistence-Http-Cookie", "type": "http-cookie", "session_max_age_s": 3600})
    );
    let cfg = Config::load(&f.path).expect("loads");
    let p = cfg
        .profiles
        .iter()
        .find(|p| p.name == "System-Persistence-Http-Cookie")
        .expect("there");
    let crate::config::PersistenceKind::HttpCookie(ck) = &p.kind else {
        panic!("not a cookie profile: {p:?}")
    };
    assert_eq!(
        ck.session_max_age.as_secs(),
        3600,
        "the file's copy replaces the built-in one"
    );
    assert_eq!(
        call(s, Method::DELETE, path, None).await.0,
        403,
        "still not deletable once edited"
    );
    assert_eq!(
        call(
            s,
            Method::POST,
            "/api/v1/profile",
            Some(json!({"name": "System-Persistence-Client-IP", "type": "client-ip"}))
        )
        .await
        .0,
        409,
        "a system name is taken"
    );
}

#[tokio::test]
async fn invalid_change_is_refused_as_the_loader_words_it_and_nothing_changes() {
    let f = fixture("invalid");
    let before = std::fs::read(&f.path).expect("file");
    let s = &f.store;
    let bad = [
        (
            Method::POST,
            "/api/v1/pool/web/backend",
            json!({"name": "b2", "address": "not-an-ip"}),
        ),
        (
            Method::PATCH,
            "/api/v1/profile/src",
            json!({"timeout_s": 999_999_999}),
        ),
        (
            Method::PATCH,
            "/api/v1/virtualservice/web",
            json!({"pool": "nope"}),
        ),
        (
            Method::PATCH,
            "/api/v1/pool/web/backend/b1",
            json!({"admin_state": "sleepy"}),
        ),
        (
            Method::PATCH,
            "/api/v1/profile/src",
            json!({"cookie_name": "X"}),
        ),
    ];
    for (m, path, body) in bad {
        // What the loader says of the same change made to the file by hand.
        let mut doc: Value = serde_json::from_slice(&before).expect("JSON");
        match path {
            "/api/v1/pool/web/backend" => {
                edit::add_backend(&mut doc, "web", body.clone()).expect("edit");
            }
            "/api/v1/pool/web/backend/b1" => {
                edit::patch_backend(&mut doc, "web", "b1", &body).expect("edit");
            }
            p => {
                let (_, rest) = p.split_at("/api/v1/".len());
                let (kind, name) = rest.split_once('/').expect("kind/name");
                let kind = edit::Kind::from_segment(kind).expect("kind");
                edit::patch(&mut doc, kind, name, &body).expect("edit");
            }
        }
        let loader =
            Config::parse(&super::store::render(&doc)).expect_err("the loader refuses it too");
        let (st, v) = call(s, m.clone(), path, Some(body)).await;
        assert_eq!(st, 422, "{m} {path}: {v}");
        assert_eq!(
            (v["field"].as_str(), v["reason"].as_str()),
            (Some(loader.path.as_str()), Some(loader.reason.as_str())),
            "{m} {path}"
        );
        assert_eq!(
            std::fs::read(&f.path).expect("file"),
            before,
            "{m} {path}: file unchanged"
        );
    }
    assert_eq!(
        f.applied.load(Ordering::SeqCst),
        0,
        "nothing reached the control loop"
    );
    // The control loop refusing (a backend that does not resolve) changes nothing either.
    f.refuse.store(true, Ordering::SeqCst);
    let (st, v) = call(
        s,
        Method::POST,
        "/api/v1/pool/web/backend",
        Some(json!({"name": "b9", "address": "10.9.9.9"})),
    )
    .await;
    assert_eq!(st, 422, "{v}");
    assert!(
        v["error"].as_str().expect("error").contains("no route"),
        "{v}"
    );
    assert_eq!(
        std::fs::read(&f.path).expect("file"),
        before,
        "file unchanged"
    );
    // Malformed requests: 400.
    f.refuse.store(false, Ordering::SeqCst);
    assert_eq!(
        call(
            s,
            Method::PATCH,
            "/api/v1/pool/web",
            Some(json!({"name": "other"}))
        )
        .await
        .0,
        400
    );
    assert_eq!(
        call(s, Method::POST, "/api/v1/pool", Some(json!([1, 2])))
            .await
            .0,
        400
    );
    assert_eq!(
        call(
            s,
            Method::POST,
            "/api/v1/pool",
            Some(json!({"backends": []}))
        )
        .await
        .0,
        400
    );
    assert_eq!(
        std::fs::read(&f.path).expect("file"),
        before,
        "file unchanged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_lose_no_update() {
    let f = fixture("concurrent");
    const EACH: usize = 20;
    let writer = |prefix: &'static str, net: u8| {
        let store = Arc::clone(&f.store);
        tokio::spawn(async move {
            for i in 0..EACH {
                let b = json!({"name": format!("{prefix}{i}"), "address": format!("10.{net}.0.{}", i + 1)});
                let (st, v) = call(&store, Method::POST, "/api/v1/pool/web/backend", Some(b)).await;
                assert_eq!(st, 201, "{v}");
            }
        })
    };
    let (a, b) = (writer("x", 1), writer("y", 2));
    a.await.expect("writer a");
    b.await.expect("writer b");
    let backends = names(&file(&f)["pools"][0]["backends"]);
    assert_eq!(backends.len(), 1 + 2 * EACH, "{backends:?}");
    for i in 0..EACH {
        for p in ["x", "y"] {
            assert!(
                backends.contains(&format!("{p}{i}")),
                "{p}{i} lost: {backends:?}"
            );
        }
    }
}

#[test]
fn merge_patch_follows_rfc7386() {
    let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
    edit::merge(
        &mut t,
        &json!({"a": "z", "c": {"f": null}, "l": [3], "n": 1}),
    );
    assert_eq!(t, json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": 1}));
}

#[test]
fn atomic_write_keeps_the_mode_and_leaves_no_temporary() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("tether-objects-atomic-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let p = dir.join("c.json");
    std::fs::write(&p, "old").expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    write_atomic(&p, "new").expect("atomic write");
    assert_eq!(std::fs::read_to_string(&p).expect("read"), "new");
    let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("c.json")]);

    // Through a symbolic link: the target is replaced, the link stays a link.
    let link = dir.join("link.json");
    std::os::unix::fs::symlink(&p, &link).expect("symlink");
    write_atomic(&link, "newer").expect("atomic write through the link");
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("lstat")
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_to_string(&p).expect("read"), "newer");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn routes_match_with_parameters() {
    let (r, p) = routes::find("/api/v1/pool/web/backend/b2").expect("route");
    assert_eq!(
        (r.path, p),
        ("/api/v1/pool/{name}/backend/{backend}", vec!["web", "b2"])
    );
    assert!(routes::find("/api/v1/pool//backend").is_none());
    assert!(routes::find("/api/v1/nothing").is_none());
    assert_eq!(
        routes::find("/metrics").expect("route").0.methods,
        &["GET", "HEAD"]
    );
}

#[test]
fn cli_backend_specs_and_set_values() {
    use super::cli::{JsonInput, backend_spec};
    assert_eq!(
        backend_spec("b3=10.0.0.13").expect("spec"),
        json!({"name": "b3", "address": "10.0.0.13"})
    );
    assert_eq!(
        backend_spec("b3=10.0.0.13:8080").expect("spec"),
        json!({"name": "b3", "address": "10.0.0.13", "port": 8080})
    );
    assert_eq!(
        backend_spec("v6=[2001:db8::1]:80").expect("spec"),
        json!({"name": "v6", "address": "2001:db8::1", "port": 80})
    );
    for bad in ["b3", "=10.0.0.1", "b3="] {
        assert!(backend_spec(bad).is_err(), "{bad:?} is refused");
    }
    let input = JsonInput {
        json: Some(r#"{"type": "http-cookie", "path": "/"}"#.into()),
        file: None,
        set: vec![
            "cookie_name=SRV".into(),
            "max_lifetime_min=30".into(),
            "http_only=false".into(),
            "path=/app".into(),
        ],
    };
    assert_eq!(
        serde_json::Value::Object(input.object().expect("object")),
        json!({"type": "http-cookie", "cookie_name": "SRV", "max_lifetime_min": 30,
               "http_only": false, "path": "/app"})
    );
    let bad = JsonInput {
        json: None,
        file: None,
        set: vec!["novalue".into()],
    };
    assert!(bad.object().is_err());
}

#[test]
fn cli_lists_mark_system_profiles() {
    let text = super::cli::render_profiles(&json!([
        {"name": "src", "type": "client-ip", "timeout_s": 1800},
        {"name": "System-Persistence-Http-Cookie", "type": "http-cookie"}
    ]));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("src ")
            && lines[0].contains("timeout_s 1800")
            && !lines[0].contains("(system)"),
        "{text}"
    );
    assert!(
        lines[1].contains("http-cookie") && lines[1].ends_with("(system)"),
        "{text}"
    );
}

#[test]
fn the_file_is_rendered_with_names_first_and_round_trips() {
    let doc: Value = serde_json::from_str(BASE).expect("JSON");
    let text = super::store::render(&doc);
    assert_eq!(
        serde_json::from_str::<Value>(&text).expect("renders JSON"),
        doc
    );
    assert!(text.starts_with("{\n  \"interface\": \"lo\",\n  \"virtual_services\": [\n    {\n      \"name\": \"web\",\n"), "{text}");
    assert!(text.contains("\"backends\": [\n        {\n          \"name\": \"b1\",\n          \"address\": \"10.0.0.11\"\n        }\n      ]"), "{text}");
    let odd = json!({"s": "quote \" and \\ and \u{1}", "e": {}, "a": [], "n": null, "f": 1.5});
    assert_eq!(
        serde_json::from_str::<Value>(&super::store::render(&odd)).expect("JSON"),
        odd
    );
}

#[tokio::test]
async fn a_hand_edit_between_read_and_write_is_not_overwritten() {
    let f = fixture("stale");
    f.tamper.store(true, Ordering::SeqCst);
    let (st, v) = call(
        &f.store,
        Method::POST,
        "/api/v1/pool/web/backend",
        Some(json!({"name": "b2", "address": "10.0.0.12"})),
    )
    .await;
    assert_eq!(st, 409, "{v}");
    assert!(
        v["error"].as_str().expect("error").contains("changed"),
        "{v}"
    );
    let text = std::fs::read_to_string(&f.path).expect("file");
    assert_eq!(
        text,
        format!("{BASE} "),
        "the hand edit stays, the change is not written"
    );
    assert_eq!(f.applied.load(Ordering::SeqCst), 0);
    // Retried on the edited file, it applies.
    f.tamper.store(false, Ordering::SeqCst);
    let (st, v) = call(
        &f.store,
        Method::POST,
        "/api/v1/pool/web/backend",
        Some(json!({"name": "b2", "address": "10.0.0.12"})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
}
