//! The access log, written off the request path.
//!
//! A request formats its line and hands it to a bounded queue; a writer
//! thread drains the queue into a buffered file or stdout and flushes when
//! the queue runs dry. A full queue drops lines (counted) rather than block
//! a request on disk I/O. The default target is `tracing` (the
//! `tether::access` event, filtered by `RUST_LOG`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use crate::config::{AccessFormat, AccessTarget};

/// Lines queued before new ones are dropped.
const QUEUE: usize = 8192;

/// Where access lines go, compiled from `[log]`.
#[derive(Debug, Clone)]
pub enum AccessLog {
    Off,
    Tracing,
    Writer { sink: Arc<Sink>, format: AccessFormat },
}

/// One writer thread and its queue; shared by snapshots with the same target.
#[derive(Debug)]
pub struct Sink {
    tx: SyncSender<String>,
    pub dropped: AtomicU64,
}

/// One finished request.
pub struct Entry<'a> {
    /// The client: the peer, or behind trusted proxies the address they named.
    pub client: IpAddr,
    /// The address the connection came from.
    pub peer: SocketAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub version: http::Version,
    pub status: u16,
    pub pool: &'a str,
    pub backend: &'a str,
    pub affinity: &'a str,
    pub attempts: usize,
    pub duration: Duration,
}

impl<'a> Entry<'a> {
    /// A request tether answered itself, before any pool (a redirect or a
    /// refusal): the client is found as for proxied requests.
    pub fn unrouted<B>(
        snap: &crate::snapshot::Snapshot,
        conn: &crate::proxy::ConnInfo,
        req: &'a http::Request<B>,
        status: u16,
        duration: Duration,
    ) -> Entry<'a> {
        Entry {
            client: crate::forwarded_for::client_ip(&snap.trusted_proxies, conn.peer.ip(), req.headers()),
            peer: conn.peer,
            method: req.method().as_str(),
            path: req.uri().path(),
            version: req.version(),
            status,
            pool: "-",
            backend: "-",
            affinity: "-",
            attempts: 0,
            duration,
        }
    }
}

impl AccessLog {
    pub fn write(&self, e: &Entry<'_>) {
        match self {
            AccessLog::Off => {}
            AccessLog::Tracing => tracing::info!(
                target: "tether::access",
                client = %e.client,
                peer = %e.peer,
                method = e.method,
                path = e.path,
                status = e.status,
                pool = e.pool,
                backend = e.backend,
                affinity = e.affinity,
                attempts = e.attempts,
                duration_ms = e.duration.as_secs_f64() * 1000.0,
            ),
            AccessLog::Writer { sink, format } => {
                let line = match format {
                    AccessFormat::Json => json_line(e),
                    AccessFormat::Combined => combined_line(e),
                };
                if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = sink.tx.try_send(line) {
                    sink.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Finds or starts the writer for a target, so reloads reuse it.
#[derive(Debug, Default)]
pub struct Sinks(Mutex<HashMap<String, Weak<Sink>>>);

impl Sinks {
    pub fn get(&self, target: &AccessTarget, format: AccessFormat) -> Result<AccessLog, String> {
        let key = match target {
            AccessTarget::Off => return Ok(AccessLog::Off),
            AccessTarget::Tracing => return Ok(AccessLog::Tracing),
            AccessTarget::Stdout => "-".to_string(),
            AccessTarget::File(p) => p.display().to_string(),
        };
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sink) = map.get(&key).and_then(Weak::upgrade) {
            return Ok(AccessLog::Writer { sink, format });
        }
        let out: Box<dyn Write + Send> = match target {
            AccessTarget::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| format!("cannot open access log `{}`: {e}", p.display()))?,
            ),
            _ => Box::new(std::io::stdout()),
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("tether-access-log".into())
            .spawn(move || drain(rx, out))
            .map_err(|e| format!("cannot start the access log writer: {e}"))?;
        let sink = Arc::new(Sink { tx, dropped: AtomicU64::new(0) });
        map.insert(key, Arc::downgrade(&sink));
        Ok(AccessLog::Writer { sink, format })
    }
}

/// Writes lines until every sender is gone; flushes whenever the queue is empty.
fn drain(rx: Receiver<String>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(line) = rx.recv() {
        let _ = out.write_all(line.as_bytes());
        while let Ok(more) = rx.try_recv() {
            let _ = out.write_all(more.as_bytes());
        }
        let _ = out.flush();
    }
}

fn json_line(e: &Entry<'_>) -> String {
    let ts = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let mut s = String::with_capacity(256);
    let _ = writeln!(
        s,
        "{{\"ts\":{ts:.3},\"client\":\"{}\",\"peer\":\"{}\",\"method\":{},\"path\":{},\"status\":{},\"pool\":{},\"backend\":{},\"affinity\":\"{}\",\"attempts\":{},\"duration_ms\":{:.3}}}",
        e.client,
        e.peer,
        json_str(e.method),
        json_str(e.path),
        e.status,
        json_str(e.pool),
        json_str(e.backend),
        e.affinity,
        e.attempts,
        e.duration.as_secs_f64() * 1000.0
    );
    s
}

fn json_str(v: &str) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "\"\"".to_string())
}

/// Apache/NCSA combined-like: `client - - [time] "METHOD path HTTP/x" status - "-" "-"`
/// followed by tether's own fields.
fn combined_line(e: &Entry<'_>) -> String {
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!(
        "{} - - [{}] \"{} {} {:?}\" {} - pool={} backend={} affinity={} attempts={} duration_ms={:.3}\n",
        e.client,
        clf_time(secs),
        e.method,
        e.path.replace('"', "%22"),
        e.version,
        e.status,
        e.pool,
        e.backend,
        e.affinity,
        e.attempts,
        e.duration.as_secs_f64() * 1000.0
    )
}

/// `10/Oct/2000:13:55:36 +0000` (UTC) from Unix seconds.
fn clf_time(secs: u64) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = MONTHS[(month - 1).clamp(0, 11) as usize];
    format!("{day:02}/{name}/{year}:{:02}:{:02}:{:02} +0000", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clf_time_formats_known_instants() {
        assert_eq!(clf_time(0), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(clf_time(971_185_336), "10/Oct/2000:13:42:16 +0000");
        assert_eq!(clf_time(1_709_210_096), "29/Feb/2024:12:34:56 +0000");
    }

    #[test]
    fn json_line_escapes_the_path() {
        let e = Entry {
            client: "127.0.0.1".parse().unwrap(),
            peer: "127.0.0.1:1".parse().unwrap(),
            method: "GET",
            path: "/a\"b",
            version: http::Version::HTTP_11,
            status: 200,
            pool: "app",
            backend: "a1",
            affinity: "new",
            attempts: 1,
            duration: Duration::from_millis(2),
        };
        let v: serde_json::Value = serde_json::from_str(json_line(&e).trim_end()).unwrap();
        assert_eq!(v["path"], "/a\"b");
        assert_eq!(v["status"], 200);
        assert_eq!(v["backend"], "a1");
        assert_eq!(v["client"], "127.0.0.1");
        assert_eq!(v["peer"], "127.0.0.1:1");
    }
}
