//! The accept loop both servers use: HTTP/1.1 with limits a slow or hostile client cannot
//! outlast. A request's headers must arrive within `header_timeout` (idle keep-alive
//! connections are closed after it too); connections that have not yet sent a whole request
//! head are capped at `max_half_open`, the oldest closed first when a new one comes; and no
//! more than `max_connections` are open at once.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tower_service::Service;

use crate::error::{failed, usage};

#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub max_half_open: usize,
    pub max_connections: usize,
}

/// Connections still waiting for their first request head, oldest first.
struct HalfOpen {
    cap: usize,
    waiting: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
    next: AtomicU64,
}

impl HalfOpen {
    /// Register a new connection; the receiver fires when it is closed to make room.
    fn enter(&self) -> (u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        while waiting.len() >= self.cap.max(1) {
            if let Some((_, oldest)) = waiting.pop_front() {
                let _ = oldest.send(());
            }
        }
        waiting.push_back((id, tx));
        (id, rx)
    }

    fn leave(&self, id: u64) {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).retain(|(i, _)| *i != id);
    }
}

/// Start the HTTP runtime, listen on `address`, print `banner` (unless `None`) and then
/// `{server}: listening on http://ADDR` (scripts and tests wait for it), and serve `router`
/// until the process stops.
pub fn run(server: &str, address: SocketAddr, limits: ConnectionLimits, router: Router, banner: Option<String>) -> crate::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("{server}-http"))
        .enable_all()
        .build()
        .map_err(|e| failed(format!("cannot start the HTTP runtime: {e}")))?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(address).await.map_err(|e| usage(format!("--listen {address}: cannot listen: {e}")))?;
        let bound = listener.local_addr()?;
        if let Some(banner) = banner {
            crate::progress::line(banner);
        }
        crate::progress::line(format!("{server}: listening on http://{bound}"));
        serve(listener, router, limits).await.map_err(|e| failed(format!("the server stopped: {e}")))
    })
}

/// Serve `router` on `listener` until the process stops. Handlers can extract
/// `ConnectInfo<SocketAddr>` for the client's address.
pub async fn serve(listener: TcpListener, router: Router, limits: ConnectionLimits) -> std::io::Result<()> {
    let half_open = Arc::new(HalfOpen { cap: limits.max_half_open, waiting: Mutex::new(VecDeque::new()), next: AtomicU64::new(0) });
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors and the like: wait for connections to close.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else { continue }; // full: the stream drops, closed
        let _ = stream.set_nodelay(true);
        let (id, evicted) = half_open.enter();
        let entered = Arc::new(AtomicBool::new(true));
        let service = {
            let (router, half_open, entered) = (router.clone(), half_open.clone(), entered.clone());
            hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                if entered.swap(false, Ordering::SeqCst) {
                    half_open.leave(id);
                }
                request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                let mut router = router.clone();
                async move { Ok::<_, Infallible>(router.call(request.map(Body::new)).await.unwrap_or_else(|never| match never {})) }
            })
        };
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let half_open = half_open.clone();
        tokio::spawn(async move {
            let evicted = async {
                if evicted.await.is_err() {
                    std::future::pending::<()>().await; // it left the queue: never evicted
                }
            };
            tokio::select! {
                _ = connection => {}
                _ = evicted => {}
            }
            if entered.load(Ordering::SeqCst) {
                half_open.leave(id);
            }
            drop(permit);
        });
    }
}
