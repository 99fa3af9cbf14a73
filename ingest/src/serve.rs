//! SHELL. The connection loop of `meterline serve` and `ingest`: every TCP (or TLS) connection
//! served by hyper's HTTP/1 server with a timer, under a cap on open connections (issue 12).
//!
//! `axum::serve` runs hyper without a timer, so no header-read timeout applied and a client that
//! opened connections and sent nothing (or one byte a second) held them, and their file
//! descriptors, forever. Here:
//! - a connection must deliver a complete request head within `header_read_timeout` of being
//!   opened, and again within it after each answer (hyper starts the same timer for the next
//!   request on a kept-alive connection), else it is closed;
//! - a connection on which no byte moves either way for `idle_timeout` is closed (a client that
//!   stopped reading its answers, a stalled TLS handshake);
//! - after `max_requests_per_connection` answers the last one carries `Connection: close`;
//! - at most `max_connections` are open at once; one more is answered a short
//!   `503` with `Retry-After: 1` and `Connection: close` (plain HTTP) or simply closed (TLS,
//!   or when even the answering is saturated), without reading its request;
//! - TLS is accepted on the same path, with its own handshake deadline.
//!
//! At start the process raises its soft open-file limit toward the hard one ([`raise_fd_limit`])
//! and the connection cap stays below it ([`connection_cap`]), so the store, the broker and the
//! log keep descriptors however many clients connect.

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request};
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Default cap on open connections (before the open-file limit lowers it).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Descriptors kept free of client connections at least: the store, the broker, the log, and the
/// connections being refused over the cap (at most [`MAX_REFUSING`]).
pub const MIN_RESERVED_FDS: u64 = 128;

/// The connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Time to deliver a complete request head, from the connection's start or the previous answer.
    pub header_read_timeout: Duration,
    /// A connection on which nothing moves either way for this long is closed.
    pub idle_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Answers per connection before `Connection: close`.
    pub max_requests_per_connection: usize,
    /// Time a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// Time in-flight calls get to finish after shutdown is requested.
    pub drain_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_requests_per_connection: 10_000,
            tls_handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft limit now in force
/// (the unchanged one, with a warning, if the raise failed).
pub fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => soft,
        Err(e) => {
            let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(s, _)| s).unwrap_or(1024);
            tracing::warn!(error = %e, soft, "could not raise the open-file limit");
            soft
        }
    }
}

/// Connections the kernel may queue before they are accepted (it caps this at `somaxconn`).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `listen` (`host:port`) with a deep accept queue: a burst of thousands of connections
/// (hostile or not) must not overflow it, or a normal client's SYN is dropped and retried a
/// second later. (`TcpListener::bind` uses 1,024.)
pub async fn bind(listen: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(listen).await? {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("`{listen}` names no address"))
    }))
}

/// PURE. The connection cap: `requested` (or [`DEFAULT_MAX_CONNECTIONS`]) but always below the
/// open-file limit `soft_fds` by a reserve of a tenth of it (at least [`MIN_RESERVED_FDS`]).
pub fn connection_cap(requested: Option<usize>, soft_fds: u64) -> usize {
    let reserve = MIN_RESERVED_FDS.max(soft_fds / 10);
    let room = usize::try_from(soft_fds.saturating_sub(reserve)).unwrap_or(usize::MAX).max(1);
    requested.unwrap_or(DEFAULT_MAX_CONNECTIONS).clamp(1, room)
}

/// Milliseconds since the first call: a cheap clock for "last progress".
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The transport, noting when a byte last moved either way.
struct Watched<T> {
    inner: T,
    last: Arc<AtomicU64>,
}

impl<T> Watched<T> {
    fn moved(&self, n: usize) {
        if n > 0 {
            self.last.store(now_ms(), Ordering::Relaxed);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.moved(n);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.moved(n);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.moved(n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The router as one connection's hyper service: adds the peer address (for failed-auth
/// throttling) and closes the connection after its request budget.
#[derive(Clone)]
struct ConnService {
    app: Router,
    peer: SocketAddr,
    served: Arc<AtomicUsize>,
    max_requests: usize,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let last = self.served.fetch_add(1, Ordering::Relaxed) + 1 >= self.max_requests;
        let mut app = self.app.clone();
        Box::pin(async move {
            // Router is always ready (its poll_ready is a constant), so `call` needs no poll_ready.
            let mut resp = tower_service::Service::call(&mut app, req).await?;
            if last {
                resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(resp)
        })
    }
}

/// The answer to a connection over the cap, written without reading its request.
const OVER_CAP: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/x-amz-json-1.1\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 115\r\n\r\n{\"__type\":\"ServiceUnavailableException\",\"message\":\"too many open connections; retry after 1 s on a new connection\"}";

/// Connections being answered [`OVER_CAP`] at once at most; beyond, they are closed at once.
const MAX_REFUSING: usize = 64;

/// Serves `app` on `listener` under `limits` (TLS when `tls` is set) until `shutdown`, then
/// closes idle connections, lets in-flight calls finish for `drain_timeout`, and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<ServerConfig>>,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the cap should prevent it.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            match Arc::clone(&refusing).try_acquire_owned() {
                Ok(p) if acceptor.is_none() => {
                    tokio::spawn(async move {
                        refuse(stream).await;
                        drop(p);
                    });
                }
                _ => drop(stream),
            }
            continue;
        };
        // Answers are small: do not hold them back for Nagle (best effort; the call works anyway).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let (app, acceptor, stop) = (app.clone(), acceptor.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let last = Arc::new(AtomicU64::new(now_ms()));
            let io = Watched { inner: stream, last: Arc::clone(&last) };
            match acceptor {
                None => drive(io, peer, app, limits, stop, last).await,
                Some(acc) => match tokio::time::timeout(limits.tls_handshake_timeout, acc.accept(io)).await {
                    Ok(Ok(tls)) => drive(tls, peer, app, limits, stop, last).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
            drop(permit);
        });
    }
    drop(listener);
    // No receiver left means no connection left: nothing to tell.
    stop_tx.send(true).ok();
    // Every connection holds a permit until it ends: all permits back = all connections closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.drain_timeout, open.acquire_many(all)).await.is_err() {
        tracing::warn!("connections still open after the drain timeout; closing them");
    }
    Ok(())
}

/// Answers [`OVER_CAP`] and closes, reading (and discarding) a little of the request first so
/// the close does not reset the connection before the client read the answer.
async fn refuse(mut stream: TcpStream) {
    let answered = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(OVER_CAP).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            let n = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        std::io::Result::Ok(())
    })
    .await;
    if !matches!(answered, Ok(Ok(()))) {
        tracing::debug!("a connection over the cap was closed before its 503 was read");
    }
}

/// Runs one connection to its end: the client closed, a timeout fired, or shutdown.
async fn drive<I>(
    io: I,
    peer: SocketAddr,
    app: Router,
    limits: ConnLimits,
    mut stop: watch::Receiver<bool>,
    last: Arc<AtomicU64>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = ConnService {
        app,
        peer,
        served: Arc::new(AtomicUsize::new(0)),
        max_requests: limits.max_requests_per_connection.max(1),
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle_ms = limits.idle_timeout.as_millis() as u64;
    let mut tick = tokio::time::interval((limits.idle_timeout / 4).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
                return;
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                // Idle connections close now; one mid-call finishes it, answered `Connection: close`.
                conn.as_mut().graceful_shutdown();
            }
            _ = tick.tick() => {
                if now_ms().saturating_sub(last.load(Ordering::Relaxed)) > idle_ms {
                    tracing::debug!(%peer, "connection idle too long: closed");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stays_below_the_open_file_limit() {
        assert_eq!(connection_cap(None, 1_048_576), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(connection_cap(None, 1024), 1024 - 128, "systemd's default soft limit");
        assert_eq!(connection_cap(Some(50_000), 20_000), 18_000, "a tenth kept free");
        assert_eq!(connection_cap(Some(100), 20_000), 100);
        assert_eq!(connection_cap(Some(0), 20_000), 1);
        assert_eq!(connection_cap(None, 10), 1);
    }

    #[test]
    fn the_over_cap_answer_declares_its_length() {
        let text = std::str::from_utf8(OVER_CAP).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }
}
