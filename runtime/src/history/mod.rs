//! Run history and the audit log, in an embedded SQLite database
//! (`DATA/history.db`, WAL mode, `synchronous=NORMAL`).
//!
//! One thread writes ([`writer`]), except that a change the caller waits for
//! is committed on the caller's thread when the writer is idle. Reads use
//! their own connection, and WAL mode lets them proceed while a batch of
//! writes is in progress. A run that was queued or running when the server
//! stopped is marked `interrupted` at the next start.

mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use self::writer::{Change, Job};

/// Maximum time a read waits for earlier changes to be committed. While
/// another process holds the database locked, each try of the writer waits
/// out its 5 s busy timeout, and it retries for minutes. Readers are not
/// blocked by such a lock, so they go on with what is stored.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// File name of the database inside the data directory.
pub const DATABASE_FILE: &str = "history.db";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    plugin TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    key_id TEXT NOT NULL,
    queued_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    status TEXT NOT NULL,
    exit_code INTEGER,
    duration_ms INTEGER,
    input TEXT,
    output TEXT,
    stdout TEXT NOT NULL DEFAULT '',
    stderr TEXT NOT NULL DEFAULT '',
    stdout_truncated INTEGER NOT NULL DEFAULT 0,
    stderr_truncated INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    decisions TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS runs_by_plugin ON runs (plugin, id);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, id);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    kind TEXT NOT NULL,
    fields TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (time);
";

/// One run as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RunRecord {
    /// Run id: sortable by queue time.
    pub id: String,
    /// Plugin name.
    pub plugin: String,
    /// Digest of the component that ran.
    pub sha256: String,
    /// Key that signed the request.
    pub key_id: String,
    /// Queue time, Unix milliseconds.
    pub queued_at_ms: i64,
    /// Start time, Unix milliseconds.
    pub started_at_ms: Option<i64>,
    /// End time, Unix milliseconds.
    pub finished_at_ms: Option<i64>,
    /// `queued`, `running`, `succeeded`, `failed`, `timed_out`, `cancelled` or `interrupted`.
    pub status: String,
    /// Exit code of a command plugin.
    pub exit_code: Option<i32>,
    /// Wall time of the run.
    pub duration_ms: Option<i64>,
    /// Input as JSON text, capped.
    pub input: Option<String>,
    /// Output text.
    pub output: Option<String>,
    /// Captured stdout, capped.
    pub stdout: String,
    /// Captured stderr, capped.
    pub stderr: String,
    /// Whether stdout was cut.
    pub stdout_truncated: bool,
    /// Whether stderr was cut.
    pub stderr_truncated: bool,
    /// Reason the run did not succeed.
    pub error: Option<String>,
    /// Capability decisions, as a JSON array.
    pub decisions: Value,
}

impl RunRecord {
    /// Returns the record of a run queued now, with a new id.
    pub fn queued(plugin: &str, sha256: &str, key_id: &str, input: Option<String>) -> RunRecord {
        RunRecord {
            id: new_run_id(),
            plugin: plugin.to_owned(),
            sha256: sha256.to_owned(),
            key_id: key_id.to_owned(),
            queued_at_ms: now_ms(),
            started_at_ms: None,
            finished_at_ms: None,
            status: "queued".into(),
            exit_code: None,
            duration_ms: None,
            input,
            output: None,
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            error: None,
            decisions: Value::Array(Vec::new()),
        }
    }
}

/// One audit event.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditEvent {
    /// Sequence number; 0 for an event not yet stored.
    pub id: i64,
    /// Unix seconds.
    pub time: i64,
    /// Event kind, such as `auth_failure` or `policy_denial`.
    pub kind: String,
    /// Details, a JSON object.
    pub fields: Value,
}

/// Filter and page of `GET /v1/runs`.
#[derive(Debug, Clone, Default)]
pub struct RunQuery {
    /// Only runs of this plugin.
    pub plugin: Option<String>,
    /// Only runs with this status.
    pub status: Option<String>,
    /// Only runs older than this run id (the previous page's last id).
    pub before: Option<String>,
    /// Page size.
    pub limit: usize,
}

/// Filter of `GET /v1/audit`.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only events at or after this Unix time.
    pub since: Option<i64>,
    /// Only events of this kind.
    pub kind: Option<String>,
    /// Most events returned, newest first.
    pub limit: usize,
}

/// Errors opening the database.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// SQLite failed.
    #[error("history database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The writer thread could not start.
    #[error("cannot start the history writer: {0}")]
    Thread(#[from] std::io::Error),
}

/// The history database.
pub struct History {
    jobs: Mutex<mpsc::Sender<Job>>,
    /// The write connection, locked during each commit by the writer thread,
    /// or by a caller when the writer is idle.
    writer: Arc<Mutex<Connection>>,
    /// Changes sent to the writer thread and not yet committed.
    queued: Arc<AtomicUsize>,
    reader: Arc<Mutex<Connection>>,
}

impl History {
    /// Opens (or creates) the database in `data_dir`, marks runs that were
    /// in flight as `interrupted`, and starts the writer.
    ///
    /// # Errors
    ///
    /// Fails when the file cannot be opened or the schema created.
    pub fn open(data_dir: &Path) -> Result<History, HistoryError> {
        let path = data_dir.join(DATABASE_FILE);
        let writer = Connection::open(&path)?;
        restrict_to_owner(&path);
        writer.pragma_update(None, "journal_mode", "WAL")?;
        writer.pragma_update(None, "synchronous", "NORMAL")?;
        writer.busy_timeout(std::time::Duration::from_secs(5))?;
        writer.execute_batch(SCHEMA)?;

        let interrupted = writer.execute(
            "UPDATE runs SET status = 'interrupted', finished_at = ?1,
                 error = 'the server stopped while the run was queued or running'
             WHERE status IN ('queued', 'running')",
            params![now_ms()],
        )?;
        if interrupted > 0 {
            tracing::warn!(
                runs = interrupted,
                "marked runs in flight at the last stop as interrupted"
            );
        }

        let reader = Connection::open(&path)?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;

        let writer = Arc::new(Mutex::new(writer));
        let queued = Arc::new(AtomicUsize::new(0));
        let (sender, receiver) = mpsc::channel();
        let (thread_writer, thread_queued) = (writer.clone(), queued.clone());
        std::thread::Builder::new()
            .name("apex-history".into())
            .spawn(move || writer::run(thread_writer, receiver, thread_queued))?;
        Ok(History {
            jobs: Mutex::new(sender),
            writer,
            queued,
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    fn send(&self, change: Change, done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>) {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        self.queued.fetch_add(1, Ordering::AcqRel);
        if jobs.send(Job { change, done }).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            tracing::error!("the history writer has stopped; a change is lost");
        }
    }

    /// Records a queued run.
    pub fn queue(&self, run: RunRecord) {
        self.send(Change::Queue(Box::new(run)), None);
    }

    /// Records a queued run and waits until it is committed, so a crash of
    /// the server after this returns cannot lose it.
    ///
    /// # Errors
    ///
    /// Returns the reason when the commit failed.
    pub async fn queue_committed(&self, run: RunRecord) -> Result<(), String> {
        self.send_committed(Change::Queue(Box::new(run))).await
    }

    /// Commits `change` on this thread when the writer is idle, or else
    /// through the writer, and waits until it is committed.
    async fn send_committed(&self, change: Change) -> Result<(), String> {
        let change = match self.commit_here(change) {
            Ok(result) => return result,
            Err(change) => change,
        };
        let (done, committed) = tokio::sync::oneshot::channel();
        self.send(change, Some(done));
        committed
            .await
            .unwrap_or_else(|_| Err("the history writer has stopped".to_string()))
    }

    /// Commits `change` on the calling thread if the writer thread is idle
    /// and every change sent to it is committed, or else gives it back.
    ///
    /// That saves the two thread hand-overs of the writer's path, which cost
    /// about as much as the commit itself. Changes that find the writer busy
    /// go to it and share its next commit.
    fn commit_here(&self, change: Change) -> Result<Result<(), String>, Change> {
        // `block_in_place` lets the runtime move its other tasks to another
        // thread during the commit, and needs the multi-thread runtime.
        let flavor = tokio::runtime::Handle::try_current().map(|runtime| runtime.runtime_flavor());
        if !matches!(flavor, Ok(tokio::runtime::RuntimeFlavor::MultiThread)) {
            return Err(change);
        }
        // The writer lowers the count only once changes are committed or
        // given up. So at zero, no change sent earlier, such as this run's
        // queued record, can overwrite this one later.
        if self.queued.load(Ordering::Acquire) != 0 {
            return Err(change);
        }
        let mut connection = match self.writer.try_lock() {
            Ok(connection) => connection,
            // A panic during an earlier commit; the transaction was rolled
            // back when it unwound, as the writer thread also assumes.
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Err(change),
        };
        let batch = [Job { change, done: None }];
        let result = tokio::task::block_in_place(|| writer::commit_logged(&mut connection, &batch));
        drop(connection);
        let [job] = batch;
        // The writer tries a failed change again, as it does its own.
        if result.is_err() && writer::worth_retrying(&job.change, true) {
            self.send(job.change, None);
        }
        Ok(result)
    }

    /// Records that a run started.
    pub fn start(&self, id: &str) {
        self.send(
            Change::Start {
                id: id.to_owned(),
                at_ms: now_ms(),
            },
            None,
        );
    }

    /// Records a finished run and waits until it is committed, so a crash of
    /// the server after this returns cannot lose it. With `synchronous=NORMAL`,
    /// a crash of the operating system or a power loss still can.
    ///
    /// # Errors
    ///
    /// Returns the reason when the commit failed.
    pub async fn finish(&self, run: RunRecord) -> Result<(), String> {
        self.send_committed(Change::Finish(Box::new(run))).await
    }

    /// Records an audit event.
    pub fn audit(&self, kind: &str, fields: Value) {
        let event = AuditEvent {
            id: 0,
            time: crate::unix_now() as i64,
            kind: kind.to_owned(),
            fields,
        };
        self.send(Change::Audit(event), None);
    }

    /// Waits until every change sent so far is committed, or for at most
    /// [`FLUSH_WAIT`] while the writer retries a failed commit.
    pub async fn flush(&self) {
        // The writer lowers the count only once changes are committed or
        // given up.
        if self.queued.load(Ordering::Acquire) == 0 {
            return;
        }
        // The writer logs a failed commit, and reads go on with what is stored.
        let barrier = self.send_committed(Change::Barrier);
        if tokio::time::timeout(FLUSH_WAIT, barrier).await.is_err() {
            tracing::warn!("the run history has changes not yet committed; reading what is stored");
        }
    }

    /// Removes runs finished more than `runs_days` ago and audit events older
    /// than `audit_days`.
    pub fn prune(&self, runs_days: u64, audit_days: u64) {
        let day_ms = 24 * 60 * 60 * 1000;
        self.send(
            Change::Prune {
                runs_before_ms: now_ms() - (runs_days as i64) * day_ms,
                audit_before: crate::unix_now() as i64 - (audit_days as i64) * 24 * 60 * 60,
            },
            None,
        );
    }

    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> rusqlite::Result<T> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let connection = reader.lock().unwrap_or_else(|e| e.into_inner());
            query(&connection)
        })
        .await
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?
    }

    /// Returns the run with `id`.
    ///
    /// # Errors
    ///
    /// Fails when the query fails.
    pub async fn run(&self, id: &str) -> rusqlite::Result<Option<RunRecord>> {
        let id = id.to_owned();
        self.read(move |db| {
            db.query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                params![id],
                run_from_row,
            )
            .optional()
        })
        .await
    }

    /// Returns a page of runs, newest first.
    ///
    /// # Errors
    ///
    /// Fails when the query fails.
    pub async fn runs(&self, query: RunQuery) -> rusqlite::Result<Vec<RunRecord>> {
        self.read(move |db| {
            let mut statement = db.prepare(&format!(
                "SELECT {RUN_COLUMNS} FROM runs
                 WHERE (?1 IS NULL OR plugin = ?1) AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR id < ?3)
                 ORDER BY id DESC LIMIT ?4"
            ))?;
            let rows = statement.query_map(
                params![query.plugin, query.status, query.before, query.limit as i64],
                run_from_row,
            )?;
            rows.collect()
        })
        .await
    }

    /// Returns audit events, newest first.
    ///
    /// # Errors
    ///
    /// Fails when the query fails.
    pub async fn audit_events(&self, query: AuditQuery) -> rusqlite::Result<Vec<AuditEvent>> {
        self.read(move |db| {
            let mut statement = db.prepare(
                "SELECT id, time, kind, fields FROM audit
                 WHERE (?1 IS NULL OR time >= ?1) AND (?2 IS NULL OR kind = ?2)
                 ORDER BY id DESC LIMIT ?3",
            )?;
            let rows = statement.query_map(params![query.since, query.kind, query.limit as i64], |row| {
                let fields: String = row.get(3)?;
                Ok(AuditEvent {
                    id: row.get(0)?,
                    time: row.get(1)?,
                    kind: row.get(2)?,
                    fields: serde_json::from_str(&fields).unwrap_or(Value::Null),
                })
            })?;
            rows.collect()
        })
        .await
    }
}

const RUN_COLUMNS: &str =
    "id, plugin, sha256, key_id, queued_at, started_at, finished_at, status, exit_code, duration_ms,
    input, output, stdout, stderr, stdout_truncated, stderr_truncated, error, decisions";

fn run_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    let decisions: String = row.get(17)?;
    Ok(RunRecord {
        id: row.get(0)?,
        plugin: row.get(1)?,
        sha256: row.get(2)?,
        key_id: row.get(3)?,
        queued_at_ms: row.get(4)?,
        started_at_ms: row.get(5)?,
        finished_at_ms: row.get(6)?,
        status: row.get(7)?,
        exit_code: row.get(8)?,
        duration_ms: row.get(9)?,
        input: row.get(10)?,
        output: row.get(11)?,
        stdout: row.get(12)?,
        stderr: row.get(13)?,
        stdout_truncated: row.get(14)?,
        stderr_truncated: row.get(15)?,
        error: row.get(16)?,
        decisions: serde_json::from_str(&decisions).unwrap_or(Value::Array(Vec::new())),
    })
}

/// Returns the current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Returns a new run id: the queue time in milliseconds, a sequence number
/// and random bits, in hex, so ids sort by the order the runs were queued.
pub fn new_run_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);

    let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed) & 0xff_ffff;
    let mut random = [0u8; 3];
    getrandom::fill(&mut random).expect("the operating system provides random bytes");
    format!("{:012x}{sequence:06x}{}", now_ms(), hex::encode(random))
}

fn restrict_to_owner(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot restrict the history database to its owner");
        }
    }
    // NOTE: on other systems the database keeps the directory's default access.
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn queued_record() -> RunRecord {
        RunRecord::queued("hello", &"00".repeat(32), "default", Some("{}".into()))
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn unawaited_change_committed_without_flush() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        let record = queued_record();
        history.queue(record.clone());

        // Nothing else is sent, so only the end of the group window commits it.
        let started = Instant::now();
        let stored = runtime().block_on(async {
            loop {
                if let Some(stored) = history.run(&record.id).await.unwrap() {
                    return Some(stored);
                }
                if started.elapsed() > Duration::from_secs(5) {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        assert_eq!(stored, Some(record));
    }

    #[test]
    fn finished_record_replaces_queued_in_same_batch() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        let record = queued_record();
        let mut finished = record.clone();
        finished.status = "succeeded".into();
        finished.started_at_ms = Some(record.queued_at_ms);
        finished.finished_at_ms = Some(record.queued_at_ms + 1);
        finished.output = Some("\"done\"".into());

        runtime().block_on(async {
            history.queue(record.clone());
            history.start(&record.id);
            history.finish(finished.clone()).await.unwrap();

            assert_eq!(history.run(&record.id).await.unwrap(), Some(finished));
            let listed = history
                .runs(RunQuery {
                    limit: 10,
                    ..RunQuery::default()
                })
                .await
                .unwrap();
            assert_eq!(listed.len(), 1);
        });
    }

    #[test]
    fn finished_record_not_overwritten_by_earlier_change() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        let record = queued_record();
        let mut finished = record.clone();
        finished.status = "succeeded".into();

        // On the multi-thread runtime, a finished record may be committed on
        // the caller's thread. The queued record waits in the writer's group
        // window, and must not be committed after it.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            history.queue(record.clone());
            history.finish(finished.clone()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            history.flush().await;
            assert_eq!(history.run(&record.id).await.unwrap(), Some(finished));
        });
    }

    #[test]
    fn start_applied_to_queued_run() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path()).unwrap();
        let record = queued_record();

        runtime().block_on(async {
            history.queue(record.clone());
            history.start(&record.id);
            history.flush().await;

            let stored = history.run(&record.id).await.unwrap().unwrap();
            assert_eq!(stored.status, "running");
            assert!(stored.started_at_ms.is_some());
        });
    }
}
