//! Serving connections: what axum's `serve` does, with the limits it lacks. Each
//! connection is HTTP/1.1 through hyper, with a deadline for every request's head (a
//! client trickling its headers is cut off) and a cap on open connections (past it,
//! new connections wait in the listen backlog until one closes). The deadline for a
//! request's body is a middleware (`mod.rs`, `body_in_time`).
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long a client may take to send a request's head or body, and how many
/// connections may be open at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub max_connections: usize,
}

/// Accept connections on `listener` and serve `app` on each, within `limits`.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits) {
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let Ok(permit) = open.clone().acquire_owned().await else {
            return; // the semaphore is never closed
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                eprintln!("warning: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _open = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            // A connection's errors (a client that left, a timeout) are its own.
            let _ = conn.await;
        });
    }
}
