//! Upgraded connections (WebSocket and other HTTP/1.1 upgrades). After the
//! backend's `101 Switching Protocols` has been relayed, the client's and
//! the backend's connections are copied into each other, bytes unchanged,
//! until either side closes (the other side then gets the end of the stream
//! and is closed too) or nothing moves either way for the pool's idle
//! timeout.
//!
//! A tunnel belongs to no listener and no snapshot, so a reload never cuts
//! it. It counts as a request in flight on its backend (least-conn and
//! bounded loads see it) and in `tether_upgraded_connections`. Shutdown
//! waits for tunnels up to its deadline, then closes them.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::health::now_ms;
use crate::live::InFlight;

/// The open tunnels of a runtime.
#[derive(Debug)]
pub struct Tunnels {
    open: watch::Sender<usize>,
    /// Set once at the shutdown deadline: every tunnel closes.
    close: watch::Sender<bool>,
}

impl Default for Tunnels {
    fn default() -> Self {
        Tunnels { open: watch::Sender::new(0), close: watch::Sender::new(false) }
    }
}

/// Counts one tunnel (globally and on its backend) until dropped.
struct Open {
    tunnels: Arc<Tunnels>,
    in_flight: InFlight,
}

impl Open {
    fn new(tunnels: Arc<Tunnels>, in_flight: InFlight) -> Self {
        tunnels.open.send_modify(|n| *n += 1);
        in_flight.live().upgraded.fetch_add(1, Ordering::Relaxed);
        Open { tunnels, in_flight }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.in_flight.live().upgraded.fetch_sub(1, Ordering::Relaxed);
        self.tunnels.open.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Tunnels {
    /// Tunnels open now.
    pub fn open(&self) -> usize {
        *self.open.borrow()
    }

    /// Joins the two sides once both upgrades have completed (the client's
    /// when hyper has written the 101). `in_flight` is held to the end.
    pub fn spawn(
        self: &Arc<Self>,
        client: OnUpgrade,
        backend: impl AsyncRead + AsyncWrite + Send + Unpin + 'static,
        idle: Duration,
        in_flight: InFlight,
    ) {
        let mut close = self.close.subscribe();
        let open = Open::new(self.clone(), in_flight);
        tokio::spawn(async move {
            let key = &open.in_flight.live().key;
            tokio::select! {
                result = run(client, backend, idle) => match result {
                    Ok(end) => tracing::debug!(pool = %key.pool, backend = %key.name, end, "upgraded connection ended"),
                    Err(e) => tracing::debug!(pool = %key.pool, backend = %key.name, error = %e, "upgraded connection failed"),
                },
                _ = close.wait_for(|closing| *closing) => {
                    tracing::info!(pool = %key.pool, backend = %key.name, "upgraded connection closed at the shutdown deadline");
                }
            }
            drop(open);
        });
    }

    /// Waits up to `deadline` for every tunnel to end, then closes the
    /// rest. Returns whether they all ended by themselves.
    pub async fn drain(&self, deadline: Duration) -> bool {
        let mut open = self.open.subscribe();
        if *open.borrow() > 0 {
            tracing::info!(open = *open.borrow(), "waiting for upgraded connections to close");
        }
        if tokio::time::timeout(deadline, open.wait_for(|n| *n == 0)).await.is_ok() {
            return true;
        }
        self.close.send_replace(true);
        // Each tunnel drops its sockets as soon as it sees the signal.
        let _ = tokio::time::timeout(Duration::from_secs(1), open.wait_for(|n| *n == 0)).await;
        false
    }
}

/// Copies both ways until either side closes (its end is passed on to the
/// other side, then both are closed) or the tunnel is idle; returns how it
/// ended.
async fn run(
    client: OnUpgrade,
    backend: impl AsyncRead + AsyncWrite + Unpin,
    idle: Duration,
) -> Result<&'static str, String> {
    let client = client.await.map_err(|e| format!("upgrade: {e}"))?;
    let last = Arc::new(AtomicU64::new(now_ms()));
    let client = Activity { inner: TokioIo::new(client), last: last.clone() };
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut backend_rx, mut backend_tx) = tokio::io::split(backend);
    let up = async {
        let copied = tokio::io::copy(&mut client_rx, &mut backend_tx).await;
        let _ = backend_tx.shutdown().await;
        copied.map(|_| "client closed")
    };
    let down = async {
        let copied = tokio::io::copy(&mut backend_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
        copied.map(|_| "backend closed")
    };
    let idle_ms = idle.as_millis().max(1) as u64;
    let idle_out = async {
        loop {
            let quiet = now_ms().saturating_sub(last.load(Ordering::Relaxed));
            if quiet >= idle_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(idle_ms - quiet)).await;
        }
    };
    tokio::select! {
        copied = up => copied.map_err(|e| format!("client to backend: {e}")),
        copied = down => copied.map_err(|e| format!("backend to client: {e}")),
        () = idle_out => Ok("idle timeout"),
    }
}

/// The client side of a tunnel, stamping every byte read from or written to
/// it: that is traffic in either direction.
struct Activity<T> {
    inner: T,
    last: Arc<AtomicU64>,
}

impl<T> Activity<T> {
    fn touch(&self) {
        self.last.store(now_ms(), Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
