//! A pids cgroup per shell call, where the server may create one.
//!
//! `RLIMIT_NPROC` counts processes per user and does not apply to root, so
//! a fork bomb started by a server that runs as root meets no limit. A
//! cgroup's `pids.max` applies to everyone. The cgroup also finds every
//! process the call started, including those that left its process group
//! with `setsid`, so all of them are killed when the call ends.
//!
//! The server creates `apex-shell-PID-N` below its own cgroup of the pids
//! controller: cgroup v1 (`/sys/fs/cgroup/pids/...`), or cgroup v2 when the
//! pids controller is enabled for the subtree of the server's cgroup. The
//! child moves itself into it between `fork` and `exec`.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Rounds of reading `cgroup.procs` and killing what it lists, before the
/// cgroup is given up as not empty. Each round waits 10 ms.
const KILL_ROUNDS: usize = 200;

/// The directory under which per-call cgroups are created.
#[derive(Debug)]
pub struct CgroupParent {
    dir: PathBuf,
}

/// Environment variable that makes the server act as if it could not create
/// cgroups, so the refusal to start can be tested where it can.
pub const DISABLE_FOR_TESTS: &str = "APEX_TEST_NO_CGROUP";

static PARENT: OnceLock<Result<CgroupParent, String>> = OnceLock::new();
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Returns where per-call cgroups go, found once per process, or why there
/// are none.
pub fn parent() -> Result<&'static CgroupParent, &'static str> {
    PARENT
        .get_or_init(CgroupParent::find)
        .as_ref()
        .map_err(String::as_str)
}

impl CgroupParent {
    fn find() -> Result<CgroupParent, String> {
        if std::env::var_os(DISABLE_FOR_TESTS).is_some() {
            return Err(format!("cgroups are disabled by {DISABLE_FOR_TESTS}"));
        }
        let membership = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let candidates = candidates(&membership, Path::new("/sys/fs/cgroup"));
        if candidates.is_empty() {
            return Err("no pids cgroup controller is mounted".into());
        }
        let mut reasons = Vec::new();
        for dir in candidates {
            let parent = CgroupParent { dir };
            // Creating and removing a cgroup proves that the server may.
            match parent.create(1) {
                Ok(probe) => {
                    drop(probe);
                    return Ok(parent);
                }
                Err(e) => reasons.push(format!("{}: {e}", parent.dir.display())),
            }
        }
        Err(format!("cannot create a pids cgroup ({})", reasons.join("; ")))
    }

    /// Creates a cgroup that allows at most `max_processes` processes.
    ///
    /// # Errors
    ///
    /// Fails when the directory cannot be created or the limit not set.
    pub fn create(&self, max_processes: u64) -> std::io::Result<CallCgroup> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!("apex-shell-{}-{id}", std::process::id()));
        std::fs::create_dir(&dir)?;
        let cgroup = CallCgroup {
            procs: CString::new(dir.join("cgroup.procs").into_os_string().into_encoded_bytes())
                .map_err(std::io::Error::other)?,
            dir,
        };
        std::fs::write(cgroup.dir.join("pids.max"), max_processes.to_string())?;
        Ok(cgroup)
    }
}

/// Directories where the server's own pids cgroup is, from the contents of
/// `/proc/self/cgroup`, for the cgroup file system mounted at `root`.
fn candidates(membership: &str, root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "pids") {
            found.push(root.join("pids").join(relative));
        } else if controllers.is_empty() {
            // cgroup v2: usable when the pids controller is enabled for the
            // subtree of the server's cgroup.
            let own = root.join(relative);
            let enabled = std::fs::read_to_string(own.join("cgroup.subtree_control"))
                .is_ok_and(|c| c.split_whitespace().any(|c| c == "pids"));
            if enabled {
                found.push(own);
            }
        }
    }
    found
}

/// The cgroup of one shell call. Dropping it kills every process in it and
/// removes it.
#[derive(Debug)]
pub struct CallCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, for the child to write its own process id to.
    procs: CString,
}

impl CallCgroup {
    /// Returns the path of `cgroup.procs`, which a process joins the
    /// cgroup by writing `0` to.
    pub fn procs_path(&self) -> &std::ffi::CStr {
        &self.procs
    }

    /// Kills every process in the cgroup, until it is empty or the rounds
    /// run out. Returns how many processes were signalled.
    pub fn kill_all(&self) -> usize {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;

        let mut signalled = 0;
        for _ in 0..KILL_ROUNDS {
            let Ok(listed) = std::fs::read_to_string(self.dir.join("cgroup.procs")) else {
                return signalled;
            };
            let pids: Vec<i32> = listed.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if pids.is_empty() {
                return signalled;
            }
            for pid in pids {
                // ESRCH means it exited on its own.
                if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                    signalled += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        signalled
    }
}

impl Drop for CallCgroup {
    fn drop(&mut self) {
        self.kill_all();
        // The kernel removes a cgroup only once its last process is reaped,
        // which can take a moment after the kill.
        for _ in 0..50 {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        tracing::warn!(cgroup = %self.dir.display(), "cannot remove the cgroup of a shell call");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_from_v1_and_v2_membership() {
        let v1 = "9:name=systemd:/\n8:pids:/user.slice\n4:memory:/x\n0::/\n";
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            candidates(v1, root),
            vec![PathBuf::from("/sys/fs/cgroup/pids/user.slice")]
        );
        // In v2 the pids controller must be enabled below the server's
        // cgroup, which a path that does not exist never has.
        assert!(candidates("0::/no/such/cgroup\n", root).is_empty());
    }
}
