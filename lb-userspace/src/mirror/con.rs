//! One handle for the two kinds of Redis connection the mirror uses: a multiplexed
//! connection to one server (one configured, or the Sentinel's master) or a cluster
//! connection (each command sent to the node serving its keys' slot; MGET split by slot).

use redis::{
    Cmd, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster_async::ClusterConnection,
};

#[derive(Clone)]
pub(super) enum Con {
    Server(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Con {
    /// Whether a command's keys must share a hash slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Con::Cluster(_))
    }
}

impl ConnectionLike for Con {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Con::Server(c) => c.req_packed_command(cmd),
            Con::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Con::Server(c) => c.req_packed_commands(pipeline, offset, count),
            Con::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Con::Server(c) => c.get_db(),
            Con::Cluster(c) => c.get_db(),
        }
    }
}
