//! Live reload: the config file changing on disk, SIGHUP and `POST /reload`
//! all send to one task, so reloads are serialised.
//!
//! A reload loads, validates and compiles the whole file off the request
//! path, binds any new listener (a bind failure fails the reload before
//! anything changed), then swaps the snapshot in one atomic store. Requests
//! in flight finish on the snapshot they loaded. Any failure leaves the
//! running configuration serving, and is logged with file:line:col and kept
//! for status and metrics.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::Runtime;
use crate::config;
use crate::impact::{self, Impact};

/// Quiet time after the last file event before reloading: editors write
/// in several steps.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Sends reload requests to the reload task.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
}

#[derive(Debug)]
struct Request {
    dry_run: bool,
    trigger: &'static str,
    reply: Option<oneshot::Sender<Outcome>>,
}

/// What one reload did (or, for a dry run, would do).
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub ok: bool,
    pub dry_run: bool,
    /// The version now in force (after an applied reload, the new one).
    pub version: u64,
    pub trigger: &'static str,
    /// One line: what changed, or why it failed.
    pub summary: String,
    pub changes: Option<Impact>,
    /// Every error, as `file:line:col: message`.
    pub errors: Vec<String>,
}

/// The last applied or failed reload, and counts, for status and metrics.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub last: Option<(u64, Outcome)>,
    pub ok: u64,
    pub failed: u64,
}

/// Starts the reload task for the config at `path`: SIGHUP always, file
/// watching unless `watch` is false. Returns once it is listening.
pub fn start(runtime: &Arc<Runtime>, path: PathBuf, watch: bool) -> Result<(), String> {
    let (tx, rx) = mpsc::channel(16);
    let handle = Handle { tx };
    if runtime.reloader.set(handle.clone()).is_err() {
        return Err("a reloader is already running".to_string());
    }
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("cannot listen for SIGHUP: {e}"))?;
        let handle = handle.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading configuration");
                handle.trigger("sighup");
            }
        });
    }
    runtime.set_config_path(path.clone());
    let watcher = if watch { Some(watch_file(&path, handle.clone())?) } else { None };
    tokio::spawn(run(Arc::downgrade(runtime), path, rx, watcher));
    Ok(())
}

impl Handle {
    /// Asks for a reload without waiting for it.
    pub fn trigger(&self, trigger: &'static str) {
        let _ = self.tx.try_send(Request { dry_run: false, trigger, reply: None });
    }
}

/// Reloads (or with `dry_run` only evaluates) and waits for the outcome.
pub async fn request(runtime: &Runtime, dry_run: bool, trigger: &'static str) -> Outcome {
    let Some(handle) = runtime.reloader.get() else {
        return failed(runtime.snapshot().version, dry_run, trigger, vec!["reload needs a config file".to_string()]);
    };
    let (reply, answer) = oneshot::channel();
    if handle.tx.send(Request { dry_run, trigger, reply: Some(reply) }).await.is_err() {
        return failed(runtime.snapshot().version, dry_run, trigger, vec!["the reload task stopped".to_string()]);
    }
    answer.await.unwrap_or_else(|_| {
        failed(runtime.snapshot().version, dry_run, trigger, vec!["the reload task stopped".to_string()])
    })
}

async fn run(
    runtime: std::sync::Weak<Runtime>,
    path: PathBuf,
    mut rx: mpsc::Receiver<Request>,
    _watcher: Option<notify::RecommendedWatcher>,
) {
    while let Some(req) = rx.recv().await {
        let Some(rt) = runtime.upgrade() else { return };
        let outcome = reload(&rt, &path, req.dry_run, req.trigger).await;
        if let Some(reply) = req.reply {
            let _ = reply.send(outcome);
        }
    }
}

/// One reload from the file at `path`.
pub async fn reload(rt: &Arc<Runtime>, path: &Path, dry_run: bool, trigger: &'static str) -> Outcome {
    let old = rt.snapshot();
    let result = match config::load(path) {
        Err(errors) => Err(errors.0.iter().map(ToString::to_string).collect()),
        Ok(cfg) => rt.compile_next(&cfg).map_err(|e| vec![format!("{}: {e}", path.display())]),
    };
    let new = match result {
        Ok(new) => new,
        Err(errors) => return record(rt, failed(old.version, dry_run, trigger, errors)),
    };
    let changes = impact::diff(&old, &new);
    let summary = changes.summary();
    if dry_run {
        return Outcome {
            ok: true,
            dry_run,
            version: old.version,
            trigger,
            summary,
            changes: Some(changes),
            errors: vec![],
        };
    }
    let server = rt.server().cloned();
    let bound = match &server {
        Some(s) => match s.bind_new(&new).await {
            Ok(b) => Some(b),
            Err(e) => return record(rt, failed(old.version, dry_run, trigger, vec![e.to_string()])),
        },
        None => None,
    };
    let version = new.version;
    rt.install(new);
    if let (Some(s), Some(b)) = (server, bound) {
        s.commit(&rt.snapshot(), b);
    }
    tracing::info!(version, trigger, "configuration reloaded: {summary}");
    record(rt, Outcome { ok: true, dry_run, version, trigger, summary, changes: Some(changes), errors: vec![] })
}

fn failed(version: u64, dry_run: bool, trigger: &'static str, errors: Vec<String>) -> Outcome {
    let summary = format!(
        "rejected ({} error{}); the running configuration keeps serving",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
    Outcome { ok: false, dry_run, version, trigger, summary, changes: None, errors }
}

/// Logs a reload's outcome and keeps it for status (dry runs are not kept).
fn record(rt: &Runtime, outcome: Outcome) -> Outcome {
    if outcome.dry_run {
        return outcome;
    }
    if !outcome.ok {
        for e in &outcome.errors {
            tracing::error!(trigger = outcome.trigger, "reload rejected: {e}");
        }
    }
    rt.push_event("reload", None, None, format!("v{}: {}", outcome.version, outcome.summary));
    let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut h = rt.reloads.lock().unwrap_or_else(|p| p.into_inner());
    if outcome.ok {
        h.ok += 1;
    } else {
        h.failed += 1;
    }
    h.last = Some((at, outcome.clone()));
    outcome
}

/// Watches the config file's directory (editors and deploy tools replace
/// files by rename, which a watch on the file itself would miss) and
/// triggers a reload once events for the file have been quiet for
/// [`DEBOUNCE`]. A file that is briefly missing is waited for, not reported.
fn watch_file(path: &Path, handle: Handle) -> Result<notify::RecommendedWatcher, String> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let file_name = path.file_name().map(|n| n.to_os_string()).ok_or("config path has no file name")?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        if event.paths.iter().any(|p| p.file_name() == Some(file_name.as_os_str())) {
            let _ = tx.send(());
        }
    })
    .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    watcher.watch(&dir, RecursiveMode::NonRecursive).map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    let path = path.to_path_buf();
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: wait until no event came for DEBOUNCE.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if path.exists() {
                tracing::info!(path = %path.display(), "config file changed: reloading");
                handle.trigger("file");
            } else {
                tracing::debug!(path = %path.display(), "config file missing for now; waiting for it to return");
            }
        }
    });
    Ok(watcher)
}
