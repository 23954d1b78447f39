//! The Lua sandbox of scripted persistence (Avi DataScript): Lua 5.4 embedded with `mlua`
//! (vendored, so no system library). The config compiles a script here to refuse a bad one;
//! the `script` persistence method calls it for every request.
//!
//! A script defines `function persist(req)`. `req` has `method`, `path`, `query` (a table of
//! query items), `headers` (lower-case names; repeated fields joined with ", "), `cookies`,
//! `client_ip` and `client_port`. It returns a persistence key (a string or a number), a
//! table `{ backend = "name" }`, or nothing.
//!
//! Sandbox: only the base, table, string, math and utf8 libraries, without `load`,
//! `loadfile`, `dofile`, `require`, `collectgarbage`, `print`, `pcall`/`xpcall` (a script
//! could otherwise catch its own cut-off and run on) and `string.dump`; no io, os, package,
//! debug or coroutine. Every call has an instruction budget (a count hook every
//! [`HOOK_STEP`] instructions) and each state a memory cap.
//!
//! Lua states are not shareable between threads while they run, so a [`ScriptPool`] keeps
//! a few, each behind a mutex, and a call takes a free one (or waits for one). Each state is
//! built on first use, and rebuilt after a call that was cut off (budget or memory), so what
//! a runaway call left half-done never reaches the next request.

#[cfg(test)]
mod tests;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Value, VmState};

/// Instructions between two checks of the budget.
pub const HOOK_STEP: u32 = 1000;

/// What one call may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Lua VM instructions per call (rounded up to a multiple of [`HOOK_STEP`]).
    pub instructions: u64,
    /// Bytes the state may allocate in all (the compiled script included).
    pub memory_bytes: usize,
}

/// Why a script was refused: where (line, when known) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ScriptError {
    /// As Lua words it, prefixed with the chunk name and line (`file.lua:3: ...`).
    pub message: String,
}

/// What a call answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// No opinion: the pool balances the request.
    Nothing,
    /// A persistence key.
    Key(Vec<u8>),
    /// A backend of the pool, by name.
    Backend(String),
}

/// Why a call gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("instruction budget exceeded")]
    Budget,
    #[error("memory limit exceeded")]
    Memory,
    #[error("{0}")]
    Failed(String),
}

/// What a script sees of a request.
#[derive(Debug, Default)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Vec<(&'a str, &'a str)>,
    /// Lower-case names.
    pub headers: Vec<(&'a str, &'a [u8])>,
    pub cookies: Vec<(&'a str, &'a str)>,
    pub client: Option<SocketAddr>,
}

/// One Lua state with the script loaded.
struct Sandbox {
    lua: Lua,
    persist: Function,
    /// Instructions counted by the hook in the current call.
    used: Arc<AtomicU64>,
    budget: u64,
}

fn lua_error(e: mlua::Error) -> String {
    match e {
        mlua::Error::SyntaxError { message, .. } => message,
        mlua::Error::RuntimeError(m) => m,
        mlua::Error::CallbackError { cause, .. } => lua_error((*cause).clone()),
        other => other.to_string(),
    }
}

fn is_memory(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory(cause),
        _ => false,
    }
}

impl Sandbox {
    /// A fresh state with `source` compiled and run (it defines `persist`), under `limits`.
    fn new(name: &str, source: &str, limits: Limits) -> Result<Sandbox, ScriptError> {
        let err = |m: String| ScriptError { message: m };
        let lua = Lua::new_with(
            StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8,
            LuaOptions::default(),
        )
        .map_err(|e| err(lua_error(e)))?;
        let g = lua.globals();
        for f in [
            "load",
            "loadfile",
            "dofile",
            "require",
            "collectgarbage",
            "print",
            "pcall",
            "xpcall",
        ] {
            g.raw_set(f, Value::Nil).map_err(|e| err(lua_error(e)))?;
        }
        if let Ok(string) = g.raw_get::<mlua::Table>("string") {
            string
                .raw_set("dump", Value::Nil)
                .map_err(|e| err(lua_error(e)))?;
        }
        let used = Arc::new(AtomicU64::new(0));
        let counter = used.clone();
        let budget = limits.instructions;
        lua.set_global_hook(
            HookTriggers::new().every_nth_instruction(HOOK_STEP),
            move |_, _| {
                let n = counter.fetch_add(HOOK_STEP as u64, Ordering::Relaxed) + HOOK_STEP as u64;
                if n > budget {
                    Err(mlua::Error::runtime("instruction budget exceeded"))
                } else {
                    Ok(VmState::Continue)
                }
            },
        )
        .map_err(|e| err(lua_error(e)))?;
        lua.set_memory_limit(limits.memory_bytes)
            .map_err(|e| err(lua_error(e)))?;
        // `=name`: Lua prints the chunk name as is (`file.lua:3: ...`).
        lua.load(source)
            .set_name(format!("={name}"))
            .exec()
            .map_err(|e| err(lua_error(e)))?;
        let persist = match g.raw_get::<Value>("persist") {
            Ok(Value::Function(f)) => f,
            _ => {
                return Err(err(format!(
                    "{name}: the script must define a function persist(req)"
                )));
            }
        };
        Ok(Sandbox {
            lua,
            persist,
            used,
            budget,
        })
    }

    fn call(&self, req: &Request<'_>) -> Result<Answer, CallError> {
        self.used.store(0, Ordering::Relaxed);
        let r = self
            .request_table(req)
            .and_then(|t| self.persist.call::<Value>(t));
        match r {
            Ok(v) => answer(v),
            Err(e) if is_memory(&e) => Err(CallError::Memory),
            // The hook only errors once the count passes the budget.
            Err(_) if self.used.load(Ordering::Relaxed) > self.budget => Err(CallError::Budget),
            Err(e) => Err(CallError::Failed(lua_error(e))),
        }
    }

    fn request_table(&self, req: &Request<'_>) -> mlua::Result<mlua::Table> {
        let lua = &self.lua;
        let t = lua.create_table()?;
        t.raw_set("method", req.method)?;
        t.raw_set("path", req.path)?;
        let query = lua.create_table()?;
        for (k, v) in &req.query {
            if !query.contains_key(*k)? {
                query.raw_set(*k, *v)?;
            }
        }
        t.raw_set("query", query)?;
        let headers = lua.create_table()?;
        let mut joined: Vec<(&str, Vec<u8>)> = Vec::new();
        for (k, v) in &req.headers {
            match joined.iter_mut().find(|(n, _)| n == k) {
                Some((_, acc)) => {
                    acc.extend_from_slice(b", ");
                    acc.extend_from_slice(v);
                }
                None => joined.push((k, v.to_vec())),
            }
        }
        for (k, v) in joined {
            headers.raw_set(k, lua.create_string(&v)?)?;
        }
        t.raw_set("headers", headers)?;
        let cookies = lua.create_table()?;
        for (k, v) in &req.cookies {
            if !cookies.contains_key(*k)? {
                cookies.raw_set(*k, *v)?;
            }
        }
        t.raw_set("cookies", cookies)?;
        if let Some(c) = req.client {
            t.raw_set("client_ip", c.ip().to_string())?;
            t.raw_set("client_port", c.port())?;
        }
        Ok(t)
    }
}

/// What `persist` returned, as an [`Answer`].
fn answer(v: Value) -> Result<Answer, CallError> {
    match v {
        Value::Nil | Value::Boolean(false) => Ok(Answer::Nothing),
        Value::String(s) if s.as_bytes().is_empty() => Ok(Answer::Nothing),
        Value::String(s) => Ok(Answer::Key(s.as_bytes().to_vec())),
        Value::Integer(i) => Ok(Answer::Key(i.to_string().into_bytes())),
        Value::Number(n) => Ok(Answer::Key(n.to_string().into_bytes())),
        Value::Table(t) => match t.raw_get::<Value>("backend") {
            Ok(Value::String(s)) => Ok(Answer::Backend(s.to_string_lossy())),
            _ => Err(CallError::Failed(
                "persist returned a table without a backend name".into(),
            )),
        },
        other => Err(CallError::Failed(format!(
            "persist returned a {}",
            other.type_name()
        ))),
    }
}

/// Compile and load `source` as the config does: `Err` names the line and the reason.
pub fn check(name: &str, source: &str, limits: Limits) -> Result<(), ScriptError> {
    Sandbox::new(name, source, limits).map(drop)
}

/// A few sandboxes of one script, for calls from any thread.
pub struct ScriptPool {
    name: String,
    source: String,
    limits: Limits,
    states: Vec<Mutex<Option<Sandbox>>>,
    next: AtomicUsize,
}

impl ScriptPool {
    /// `size` states (at least one), each built on first use.
    pub fn new(name: &str, source: &str, limits: Limits, size: usize) -> ScriptPool {
        ScriptPool {
            name: name.to_string(),
            source: source.to_string(),
            limits,
            states: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Run `persist(req)` in a free state (waiting for one when all are busy).
    pub fn call(&self, req: &Request<'_>) -> Result<Answer, CallError> {
        let n = self.states.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut slot = (0..n)
            .find_map(|i| self.states[(start + i) % n].try_lock().ok())
            .unwrap_or_else(|| self.states[start].lock().unwrap_or_else(|e| e.into_inner()));
        if slot.is_none() {
            let s = Sandbox::new(&self.name, &self.source, self.limits)
                .map_err(|e| CallError::Failed(e.message))?;
            *slot = Some(s);
        }
        let sandbox = slot.as_ref().expect("built above");
        let r = sandbox.call(req);
        if matches!(r, Err(CallError::Budget | CallError::Memory)) {
            // Cut off mid-call: start the next call from a clean state.
            *slot = None;
        }
        r
    }
}
