//! What the mirror (`crate::mirror`) sees of an engine, its service name and its tables by
//! id (the same ids the saved state uses: method and key source, or `fallback`), and what
//! the engine asks of it: the binding of a key its own tables miss, where the input can
//! wait ([`Engine::decide_or_ask`]).

use std::{net::SocketAddr, sync::Arc, time::Instant};

use futures_util::future::BoxFuture;

use super::{
    Choice, Decided, Engine, Refusal,
    input::Input,
    methods::{Binding, Lookup, Method, TableRef},
};

/// Another instance's binding: (index of the key asked about, backend identity).
pub type Found = Option<(usize, u32)>;

/// Where the other instances' bindings can be asked for (the mirror's Redis).
pub trait Remote: Send + Sync {
    /// Ask for the first of `keys` (table id, table key) of `service` that is bound. The
    /// future resolves within the remote's own bound (a timeout or an error is no binding).
    /// `None`: not asked (not connected): the caller decides locally at once.
    fn lookup(&self, service: &str, keys: &[(String, u128)]) -> Option<BoxFuture<'static, Found>>;
}

/// A local miss the remote is being asked about ([`Engine::decide_or_ask`]).
pub struct Miss {
    pub(super) lookup: BoxFuture<'static, Found>,
    pub(super) keys: Vec<(String, u128)>,
    /// What the method found in the input: the decision after the answer reuses it rather
    /// than run the method (a script) again.
    pub(super) first: Lookup,
}

/// The remote's answer to a [`Miss`], to give to [`Engine::decide_answered`].
pub struct Answer {
    keys: Vec<(String, u128)>,
    found: Found,
    first: Lookup,
}

impl Miss {
    /// Wait for the remote's answer (bounded by the remote).
    pub async fn answer(self) -> Answer {
        Answer {
            found: self.lookup.await,
            keys: self.keys,
            first: self.first,
        }
    }
}

impl std::fmt::Debug for Miss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Miss").field("keys", &self.keys).finish()
    }
}

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

    /// Ask `remote` about the keys this engine's tables miss, or nobody (`None`).
    pub fn set_remote(&self, remote: Option<Arc<dyn Remote>>) {
        self.remote.store(remote.map(Arc::new));
    }

    /// Ask nobody any more, if `remote` is the one asked now (a successor's is kept).
    pub fn unset_remote(&self, remote: &Arc<dyn Remote>) {
        let ours = Arc::as_ptr(remote) as *const ();
        let current = self.remote.load();
        if current
            .as_ref()
            .is_some_and(|r| Arc::as_ptr(&**r) as *const () == ours)
        {
            self.remote.store(None);
        }
    }

    /// Take the binding the remote found into the local table, when its backend is in the
    /// pool now (the next decision then honours it, under the profile's down policy, like
    /// a binding the channel brought). Whether one was taken.
    pub fn take(&self, answer: &Answer) -> bool {
        let Some((i, identity)) = answer.found else {
            return false;
        };
        let Some((table_id, key)) = answer.keys.get(i) else {
            return false;
        };
        let snap = self.snapshot.load();
        let Some(prep) = self.prepared(&snap) else {
            return false;
        };
        if !prep.identities.contains_key(&identity) {
            log::debug!(
                "{}: the mirror binds a key to backend {identity}, not in the pool",
                self.service
            );
            return false;
        }
        let now = Instant::now();
        for (_, id, t) in self.tables() {
            if id == *table_id {
                match t {
                    TableRef::Clients { table, .. } => {
                        table.apply(key.to_be_bytes(), identity, now);
                    }
                    TableRef::Keys(table) => {
                        table.apply(*key, identity, now);
                    }
                }
                return true;
            }
        }
        false
    }

    /// Decide `input` once the remote answered its [`Miss`]: the binding found is taken
    /// ([`Engine::take`]), and the method's lookup is not run again (a script runs once per
    /// input): its first result is used with what its table holds now.
    pub fn decide_answered(
        &self,
        input: &mut Input<'_>,
        tried: &[SocketAddr],
        answer: &Answer,
    ) -> Result<Choice, Refusal> {
        self.take(answer);
        match self.decide_with(input, tried, false, Some(answer))? {
            Decided::Chosen(c) => Ok(c),
            // Only with `ask`.
            Decided::Miss(_) => Err(Refusal::NoBackend),
        }
    }

    /// The method's lookup of an input that waited for the remote: the first lookup's,
    /// bound to what the method's table holds now for the keys asked about (the remote's
    /// binding just taken, or one another input stored meanwhile).
    pub(super) fn lookup_answered(&self, m: &dyn Method, answer: &Answer, now: Instant) -> Lookup {
        let mut lookup = answer.first.clone();
        let id = m.table_id();
        let tables = m.tables();
        let bound = answer
            .keys
            .iter()
            .filter(|(table_id, _)| *table_id == id)
            .find_map(|(_, key)| {
                tables.iter().find_map(|t| match t {
                    TableRef::Keys(table) => table.get(key, now).ok(),
                    TableRef::Clients { table, .. } => table.get(&key.to_be_bytes(), now).ok(),
                })
            });
        if let Some(identity) = bound {
            lookup.binding = Some(Binding::Identity(identity));
        }
        lookup
    }

    /// [`Engine::decide`], first asking the remote about a local miss of a stored table
    /// (on a first attempt; a retry decides locally). For inputs that can wait.
    pub async fn decide_asking(
        &self,
        input: &mut Input<'_>,
        tried: &[SocketAddr],
    ) -> Result<Choice, Refusal> {
        if tried.is_empty() {
            match self.decide_or_ask(input)? {
                Decided::Chosen(c) => return Ok(c),
                Decided::Miss(m) => return self.decide_answered(input, tried, &m.answer().await),
            }
        }
        self.decide(input, tried)
    }
}
