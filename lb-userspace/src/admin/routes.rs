//! The admin API's route table, as data: the router dispatches on it (404 for a path it
//! lacks, 405 with `Allow` for a method it lacks), and a test checks that
//! `docs/openapi.json` documents exactly these routes.

/// One path (with `{param}` segments, as OpenAPI writes them) and its methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub path: &'static str,
    pub methods: &'static [&'static str],
}

const OBJECT: &[&str] = &["GET", "PUT", "PATCH", "DELETE"];
const COLLECTION: &[&str] = &["GET", "POST"];

/// Every route the admin API serves.
pub const ROUTES: &[Route] = &[
    Route {
        path: "/metrics",
        methods: &["GET", "HEAD"],
    },
    Route {
        path: "/status",
        methods: &["GET", "HEAD"],
    },
    Route {
        path: "/persist",
        methods: &["GET", "HEAD"],
    },
    Route {
        path: "/persist/flush",
        methods: &["POST"],
    },
    Route {
        path: "/api/v1/virtualservice",
        methods: COLLECTION,
    },
    Route {
        path: "/api/v1/virtualservice/{name}",
        methods: OBJECT,
    },
    Route {
        path: "/api/v1/pool",
        methods: COLLECTION,
    },
    Route {
        path: "/api/v1/pool/{name}",
        methods: OBJECT,
    },
    Route {
        path: "/api/v1/pool/{name}/backend",
        methods: &["POST"],
    },
    Route {
        path: "/api/v1/pool/{name}/backend/{backend}",
        methods: &["GET", "PATCH", "DELETE"],
    },
    Route {
        path: "/api/v1/profile",
        methods: COLLECTION,
    },
    Route {
        path: "/api/v1/profile/{name}",
        methods: OBJECT,
    },
];

/// The route `path` matches and the values of its `{param}` segments, in order.
pub fn find(path: &str) -> Option<(&'static Route, Vec<&str>)> {
    let got: Vec<&str> = path.split('/').collect();
    ROUTES.iter().find_map(|r| {
        let want: Vec<&str> = r.path.split('/').collect();
        if want.len() != got.len() {
            return None;
        }
        let mut params = Vec::new();
        for (w, g) in want.iter().zip(&got) {
            if w.starts_with('{') {
                if g.is_empty() {
                    return None;
                }
                params.push(*g);
            } else if w != g {
                return None;
            }
        }
        Some((r, params))
    })
}

#[cfg(test)]
mod tests;
