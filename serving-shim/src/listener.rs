//! The accept loop of the HTTP front end (HTTP/1.1 over hyper), with the limits that keep a
//! client from holding the server ([`Limits`]):
//!
//! - a connection must send a request's headers within `header_read_timeout` of the server
//!   starting to wait for them (a new connection, or an idle kept-alive one), or it is closed;
//! - at most `max_connections` are open at once: beyond, new connections wait in the listen
//!   backlog until one closes;
//! - after the shutdown signal nothing new is accepted, open connections finish their response
//!   and close, and after `shutdown_timeout` the ones still open are cut, so shutdown always
//!   ends.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

/// The front end's connection limits (`trail serve --header-read-timeout`,
/// `--max-connections`, `--shutdown-timeout`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Longest wait for a request's headers.
    pub header_read_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// After the shutdown signal, how long open connections may take to finish.
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    /// 10 s for headers, 256 connections, 30 s to shut down.
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 256,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Connections still open at the shutdown deadline, cut.
    pub cut: usize,
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then lets open
/// connections finish until the deadline and cuts the rest.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<Stopped> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (closing, close_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        tasks.spawn(connection(
            stream,
            router.clone(),
            limits.header_read_timeout,
            close_rx.clone(),
            permit,
        ));
    }
    drop(listener);
    let _ = closing.send(true);
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    let cut = if drained { 0 } else { tasks.len() };
    if cut > 0 {
        tracing::warn!(
            "{cut} connections still open {:?} after the shutdown signal: cut",
            limits.shutdown_timeout
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    Ok(Stopped { cut })
}

/// One connection: HTTP/1.1 with the header-read timeout, closed gracefully when the server
/// starts closing. The permit is its slot under `max_connections`.
async fn connection(
    stream: TcpStream,
    router: Router,
    header_read_timeout: Duration,
    mut closing: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let service = TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = closing.wait_for(|&c| c) => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}
