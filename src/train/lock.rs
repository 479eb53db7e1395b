//! One run per output folder: a lock file that two processes (or two runs of one process) on the
//! same `--out` cannot both hold, so they cannot interleave their metrics or checkpoints.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::{io_err, Result, TrainError};

/// The lock file's name inside the output folder.
pub const LOCK_FILE: &str = ".vppo-train.lock";

/// Holds `dir` for one run; removes the lock file when dropped.
#[derive(Debug)]
pub struct OutLock {
    path: PathBuf,
}

/// Whether process `pid` is alive (Linux: /proc/<pid> exists). Elsewhere a lock is never taken
/// to be stale.
fn alive(pid: &str) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && Path::new("/proc").join(pid).exists()
}

impl OutLock {
    /// Takes the lock of `dir` (created if needed): creates the lock file holding this process's
    /// id and a tag, exclusively. A lock left by a process that is gone (on Linux) is taken over;
    /// a live one is [`TrainError::Busy`].
    pub fn acquire(dir: &Path) -> Result<OutLock> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(LOCK_FILE);
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id()).map_err(io_err(&path))?;
                    return Ok(OutLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let pid = std::fs::read_to_string(&path).unwrap_or_default();
                    let pid = pid.trim().to_string();
                    if alive(&pid) {
                        return Err(TrainError::Busy {
                            dir: dir.to_path_buf(),
                            lock: path,
                            pid,
                        });
                    }
                    // Stale: its process is gone. Remove it and try once more (a racing taker
                    // that wins makes our create_new fail, and we report it busy).
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Err(TrainError::Busy {
            dir: dir.to_path_buf(),
            lock: path,
            pid: "unknown".into(),
        })
    }
}

impl Drop for OutLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_held_by_one_run_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let lock = OutLock::acquire(dir.path()).unwrap();
        // Within one process too (this pid is alive).
        let e = OutLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(e, TrainError::Busy { .. }), "{e}");
        assert!(e.to_string().contains("in use by another vppo train"));
        drop(lock);
        assert!(!dir.path().join(LOCK_FILE).exists());
        let again = OutLock::acquire(dir.path()).unwrap();
        drop(again);
        // A lock whose process is gone is taken over (Linux).
        if Path::new("/proc/self").exists() {
            std::fs::write(dir.path().join(LOCK_FILE), "4294967295").unwrap();
            OutLock::acquire(dir.path()).unwrap();
        }
    }
}
