use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::{BackendSlots, Pool, UpstreamError};
use crate::proxy::{Limits, body::ProxyBody, h1client::ResponseBody};

const TIMEOUT: Duration = Duration::from_secs(10);

fn limits(max_per_backend: usize) -> Limits {
    Limits {
        max_connections_per_backend: max_per_backend,
        upstream_connect_timeout: Duration::from_secs(30),
        ..crate::proxy::tests::test_limits()
    }
}

/// A keep-alive backend answering every request `200 ok`; counts its connections.
async fn backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counter = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(Ok(n)) = tokio::time::timeout(TIMEOUT, tcp.read(&mut buf)).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        got.drain(..end + 4);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if tcp.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, conns)
}

fn get() -> Request<ProxyBody> {
    Request::get("/")
        .header(header::HOST, "x")
        .body(ProxyBody::empty())
        .unwrap()
}

async fn request(pool: &Pool, addr: SocketAddr) -> Response<ResponseBody<ProxyBody>> {
    match tokio::time::timeout(TIMEOUT, pool.request(addr, get())).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(UpstreamError::Saturated)) => panic!("saturated"),
        Ok(Err(_)) => panic!("request failed"),
        Err(_) => panic!("no response within {TIMEOUT:?}"),
    }
}

async fn finish(resp: Response<ResponseBody<ProxyBody>>) {
    assert_eq!(resp.status(), StatusCode::OK);
    let body = tokio::time::timeout(TIMEOUT, resp.into_body().collect())
        .await
        .expect("body within the timeout")
        .unwrap()
        .to_bytes();
    assert_eq!(body, "ok");
}

/// Polls `cond` (bounded) until it holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never: {what}");
}

fn waiting(slots: &BackendSlots, addr: SocketAddr) -> usize {
    slots.slots.lock().unwrap()[&addr]
        .waiting
        .load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_frees_slot_entries_of_a_backend_two_workers_used() {
    let (addr, _) = backend().await;
    let slots = BackendSlots::default();
    let mut short = limits(4);
    // Idle connections age out at once, so that the sweep closes them.
    short.idle_timeout = Duration::from_millis(1);
    let (one, two) = (
        Pool::new(short, slots.clone()),
        Pool::new(short, slots.clone()),
    );
    for pool in [&one, &two] {
        finish(request(pool, addr).await).await;
    }
    assert_eq!(slots.backends(), 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    one.sweep();
    two.sweep();
    assert_eq!(
        slots.backends(),
        0,
        "no connection open and no request: the backend's entries are gone"
    );
    // Made again on demand.
    finish(request(&one, addr).await).await;
    assert_eq!(slots.backends(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_keeps_slots_while_a_connection_is_open() {
    let (addr, _) = backend().await;
    let slots = BackendSlots::default();
    let (one, two) = (
        Pool::new(limits(4), slots.clone()),
        Pool::new(limits(4), slots.clone()),
    );
    finish(request(&two, addr).await).await;
    let busy = request(&one, addr).await;
    one.sweep();
    two.sweep();
    assert_eq!(slots.backends(), 1, "a busy and an idle connection hold it");
    finish(busy).await;
}

/// With one slot: a connection returned to worker one goes to worker one's waiter (reused),
/// and once worker one has no waiter left it is closed for worker two's waiter (which
/// could not take it from worker one's pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_connection_goes_to_a_waiter_that_can_use_it() {
    let (addr, conns) = backend().await;
    let slots = BackendSlots::default();
    let one = Arc::new(Pool::new(limits(1), slots.clone()));
    let two = Arc::new(Pool::new(limits(1), slots.clone()));
    let first = request(&one, addr).await;
    // Worker two waits first, then worker one.
    let other = {
        let two = two.clone();
        tokio::spawn(async move { finish(request(&two, addr).await).await })
    };
    until("worker two waits", || waiting(&slots, addr) == 1).await;
    let same = {
        let one = one.clone();
        tokio::spawn(async move { finish(request(&one, addr).await).await })
    };
    until("both wait", || waiting(&slots, addr) == 2).await;
    finish(first).await;
    tokio::time::timeout(TIMEOUT, same)
        .await
        .expect("worker one's waiter served")
        .unwrap();
    tokio::time::timeout(TIMEOUT, other)
        .await
        .expect("worker two's waiter served")
        .unwrap();
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "worker one's waiter reused the connection; worker two's got the freed slot"
    );
}
