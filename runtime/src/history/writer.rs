//! The single writer of the history database.
//!
//! Changes go through one thread that locks the write connection while it
//! commits. It takes every change waiting in its queue and commits them in
//! one transaction, so many concurrent runs cost one `fsync`-free WAL commit
//! instead of one each. A change that must be durable before the caller goes
//! on (a finished run) carries an acknowledgement that is sent after commit.
//! When the writer is idle and has nothing queued, such a change is
//! committed on the caller's thread instead (`History::commit_here`).
//!
//! A batch without an acknowledgement is held for up to [`GROUP_WINDOW`], so
//! that it shares a commit with the changes that follow. A short run then
//! costs one commit instead of two, because its finished record replaces its
//! queued record in the same batch. A crash inside the window loses those
//! unacknowledged changes.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};

use super::{AuditEvent, RunRecord};

/// Largest number of changes committed in one transaction.
const MAX_BATCH: usize = 512;

/// Maximum time an unacknowledged change stays uncommitted.
const GROUP_WINDOW: Duration = Duration::from_millis(2);

/// Commits of a failed batch tried before its changes are given up, with a
/// pause of [`retry_pause`] before each: about two minutes in all, on top of
/// the busy timeout of each try.
const COMMIT_ATTEMPTS: u32 = 30;

/// Writes a whole run record, new or replacing the earlier one.
const UPSERT_RUN: &str = "INSERT OR REPLACE INTO runs (id, plugin, sha256, key_id, queued_at, started_at,
        finished_at, status, exit_code, duration_ms, input, output, stdout, stderr, stdout_truncated,
        stderr_truncated, error, decisions)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)";

/// One change to the database.
pub enum Change {
    /// A new run, queued.
    Queue(Box<RunRecord>),
    /// A queued run started, at Unix milliseconds.
    Start { id: String, at_ms: i64 },
    /// A run ended; the whole record is replaced.
    Finish(Box<RunRecord>),
    /// An audit event.
    Audit(AuditEvent),
    /// Removes runs finished and audit events recorded before these Unix
    /// milliseconds and seconds.
    Prune { runs_before_ms: i64, audit_before: i64 },
    /// Changes nothing; its acknowledgement means that earlier changes are committed.
    Barrier,
}

/// A change and, optionally, whom to tell once it is committed.
pub struct Job {
    pub change: Change,
    pub done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

/// Runs the writer loop until every sender is dropped.
///
/// `queued` counts the changes sent and not yet committed. The writer lowers
/// it only once they are committed or given up, so a count of zero means
/// that no change sent so far can still be written.
///
/// A batch that fails to commit is reported to its waiters at once, and
/// tried again with the changes that arrived meanwhile, up to
/// [`COMMIT_ATTEMPTS`] times. So a database locked for a while by another
/// process delays the history but loses nothing. Its changes stay counted in
/// `queued` until they are committed or given up.
pub fn run(connection: Arc<Mutex<Connection>>, jobs: mpsc::Receiver<Job>, queued: Arc<AtomicUsize>) {
    let mut failed: Vec<Job> = Vec::new();
    let mut attempts = 0;
    loop {
        let batch = if failed.is_empty() {
            let Ok(first) = jobs.recv() else {
                break;
            };
            collect_batch(first, &jobs)
        } else {
            std::thread::sleep(retry_pause(attempts));
            let mut batch = std::mem::take(&mut failed);
            batch.extend(jobs.try_iter().take(MAX_BATCH));
            batch
        };
        let mut connection = connection.lock().unwrap_or_else(|e| e.into_inner());
        let result = commit_logged(&mut connection, &batch);
        let give_up = result.is_err() && attempts + 1 >= COMMIT_ATTEMPTS;
        if give_up {
            tracing::error!(
                attempts = COMMIT_ATTEMPTS,
                runs = ?run_ids(&batch),
                "gave up writing these changes to the run history"
            );
        }
        let retry = result.is_err() && !give_up;
        attempts = if retry { attempts + 1 } else { 0 };

        let mut waiters = Vec::new();
        let mut settled = 0;
        for job in batch {
            let awaited = job.done.is_some();
            waiters.extend(job.done);
            if retry && worth_retrying(&job.change, awaited) {
                failed.push(Job {
                    change: job.change,
                    done: None,
                });
            } else {
                settled += 1;
            }
        }
        queued.fetch_sub(settled, Ordering::Release);
        drop(connection);
        for done in waiters {
            let _ = done.send(result.clone());
        }
    }
}

/// Returns the pause before commit attempt `attempts` + 1 of a failed batch:
/// 100 ms, doubling up to 5 s.
fn retry_pause(attempts: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempts.min(6)).min(5000))
}

/// Returns whether `change`, whose commit failed, is written later. A queued
/// record that its caller waited for is not, because that caller rejects
/// the run.
pub fn worth_retrying(change: &Change, awaited: bool) -> bool {
    match change {
        Change::Queue(_) => !awaited,
        Change::Barrier => false,
        _ => true,
    }
}

/// Returns the ids of the runs that `batch` changes, for logs.
pub fn run_ids(batch: &[Job]) -> Vec<&str> {
    batch
        .iter()
        .filter_map(|job| match &job.change {
            Change::Queue(run) | Change::Finish(run) => Some(run.id.as_str()),
            Change::Start { id, .. } => Some(id.as_str()),
            _ => None,
        })
        .collect()
}

/// Collects the changes to commit together, starting with `first`: every
/// change already queued, and those arriving within [`GROUP_WINDOW`] until
/// one of them carries an acknowledgement.
fn collect_batch(first: Job, jobs: &mpsc::Receiver<Job>) -> Vec<Job> {
    let deadline = Instant::now() + GROUP_WINDOW;
    let mut awaited = first.done.is_some();
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        let next = if awaited {
            jobs.try_recv().ok()
        } else {
            // A timeout ends the window, and a disconnect ends the writer
            // after this batch.
            jobs.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok()
        };
        let Some(job) = next else {
            break;
        };
        awaited |= job.done.is_some();
        batch.push(job);
    }
    batch
}

/// Commits `batch` in one transaction, logging a failure.
pub fn commit_logged(connection: &mut Connection, batch: &[Job]) -> Result<(), String> {
    commit(connection, batch).map_err(|e| {
        tracing::error!(
            error = %e,
            changes = batch.len(),
            runs = ?run_ids(batch),
            "cannot write to the run history and audit log"
        );
        e.to_string()
    })
}

fn commit(connection: &mut Connection, batch: &[Job]) -> rusqlite::Result<()> {
    // A finished record replaces the whole row, so the run's earlier changes
    // in this batch need not be written.
    let finished: HashSet<&str> = batch
        .iter()
        .filter_map(|job| match &job.change {
            Change::Finish(run) => Some(run.id.as_str()),
            _ => None,
        })
        .collect();

    let transaction = connection.transaction()?;
    for job in batch {
        let superseded = match &job.change {
            Change::Queue(run) => finished.contains(run.id.as_str()),
            Change::Start { id, .. } => finished.contains(id.as_str()),
            _ => false,
        };
        if !superseded {
            apply(&transaction, &job.change)?;
        }
    }
    transaction.commit()
}

fn apply(db: &Connection, change: &Change) -> rusqlite::Result<()> {
    match change {
        Change::Queue(run) | Change::Finish(run) => {
            let mut statement = db.prepare_cached(UPSERT_RUN)?;
            statement.execute(params![
                run.id,
                run.plugin,
                run.sha256,
                run.key_id,
                run.queued_at_ms,
                run.started_at_ms,
                run.finished_at_ms,
                run.status,
                run.exit_code,
                run.duration_ms,
                run.input,
                run.output,
                run.stdout,
                run.stderr,
                run.stdout_truncated,
                run.stderr_truncated,
                run.error,
                run.decisions.to_string(),
            ])?;
        }
        Change::Start { id, at_ms } => {
            db.prepare_cached(
                "UPDATE runs SET status = 'running', started_at = ?2 WHERE id = ?1 AND status = 'queued'",
            )?
            .execute(params![id, at_ms])?;
        }
        Change::Audit(event) => {
            db.prepare_cached("INSERT INTO audit (time, kind, fields) VALUES (?1, ?2, ?3)")?
                .execute(params![event.time, event.kind, event.fields.to_string()])?;
        }
        Change::Prune {
            runs_before_ms,
            audit_before,
        } => {
            let runs = db.execute(
                "DELETE FROM runs WHERE finished_at IS NOT NULL AND finished_at < ?1",
                params![runs_before_ms],
            )?;
            let events = db.execute("DELETE FROM audit WHERE time < ?1", params![audit_before])?;
            if runs + events > 0 {
                tracing::info!(runs, audit_events = events, "pruned history past its retention");
            }
        }
        Change::Barrier => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rusqlite::Connection;

    use super::super::{RunRecord, SCHEMA, now_ms};
    use super::{COMMIT_ATTEMPTS, Change, Job, commit, retry_pause, worth_retrying};

    #[test]
    fn failed_commits_retried_for_minutes() {
        assert_eq!(retry_pause(0), Duration::from_millis(100));
        assert_eq!(retry_pause(3), Duration::from_millis(800));
        assert_eq!(retry_pause(40), Duration::from_secs(5));
        let total: Duration = (0..COMMIT_ATTEMPTS).map(retry_pause).sum();
        assert!(
            total > Duration::from_secs(90) && total < Duration::from_secs(180),
            "{total:?}"
        );
    }

    #[test]
    fn rejected_run_not_retried() {
        let record = RunRecord::queued("hello", &"00".repeat(32), "default", None);
        let queued = Change::Queue(Box::new(record.clone()));

        // A background run whose queued record failed was rejected with 503.
        assert!(!worth_retrying(&queued, true));
        assert!(worth_retrying(&queued, false));
        assert!(worth_retrying(&Change::Finish(Box::new(record)), true));
        assert!(!worth_retrying(&Change::Barrier, true));
    }

    fn job(change: Change) -> Job {
        Job { change, done: None }
    }

    #[test]
    fn finished_record_supersedes_earlier_changes_in_batch() {
        let mut connection = Connection::open_in_memory().unwrap();
        connection.execute_batch(SCHEMA).unwrap();
        let queued = RunRecord::queued("hello", &"00".repeat(32), "default", None);
        let mut finished = queued.clone();
        finished.status = "succeeded".into();

        // Written in order, the queued record and the start would overwrite
        // the finished record that comes before them in this batch.
        let batch = [
            job(Change::Finish(Box::new(finished))),
            job(Change::Queue(Box::new(queued.clone()))),
            job(Change::Start {
                id: queued.id.clone(),
                at_ms: now_ms(),
            }),
        ];
        commit(&mut connection, &batch).unwrap();

        let status: String = connection
            .query_row("SELECT status FROM runs WHERE id = ?1", [&queued.id], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(status, "succeeded");
    }
}
