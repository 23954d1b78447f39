//! What the mirror (`crate::mirror`) sees of an engine: its service name and its tables by
//! id, the same ids the saved state uses (method and key source, or `fallback`).

use super::{Engine, methods::TableRef};

impl Engine {
    /// The virtual service this engine decides for.
    pub fn service_name(&self) -> &str {
        &self.service
    }

    /// Every table the engine keeps, by id.
    pub fn tables_by_id(&self) -> Vec<(String, TableRef<'_>)> {
        self.tables()
            .into_iter()
            .map(|(_, id, t)| (id, t))
            .collect()
    }
}
