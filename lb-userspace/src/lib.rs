//! tether daemon library: configuration, the XDP data plane and (later) health checks,
//! persistence tables, the L7 proxy and the admin API. The `tether` binary is a thin CLI
//! over these modules; integration tests use them directly.

pub mod admin;
pub mod balancer;
pub mod cidr;
pub mod config;
pub mod control;
pub mod cookie;
pub mod dataplane;
pub mod engine;
pub mod frontends;
pub mod handoff;
pub mod health;
pub mod mirror;
pub mod neterr;
pub mod notify;
pub mod passthrough;
pub mod proxy;
pub mod rlimit;
pub mod script;
pub mod state;
pub mod tlswire;
pub mod top;
pub mod udp_proxy;
pub mod workers;
