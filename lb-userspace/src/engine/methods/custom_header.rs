//! Avi custom HTTP header persistence: the named header's value is matched against each
//! backend's `header_value`; a request whose value matches no backend is balanced normally.

use super::{Binding, Context, Lookup, Method};
use crate::{config::Pool, engine::input::Input};

pub struct CustomHeader {
    /// Lower case.
    header: String,
}

impl CustomHeader {
    pub fn new(header: &str) -> Self {
        CustomHeader {
            header: header.to_string(),
        }
    }
}

impl Method for CustomHeader {
    fn kind(&self) -> &'static str {
        "custom-header"
    }

    fn lookup(&self, input: &mut Input<'_>, pool: &Pool, _: &Context<'_>) -> Lookup {
        let binding = input.header(&self.header).and_then(|v| {
            pool.backends
                .iter()
                .position(|b| b.header_value.as_deref().map(str::as_bytes) == Some(v))
                .map(Binding::Index)
        });
        Lookup {
            binding,
            ..Lookup::default()
        }
    }
}
