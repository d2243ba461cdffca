//! Where bodies wait while they arrive: one file per upload in this process's own directory
//! under `FOLLOW_SPOOL_DIR`, removed with the upload. The directory goes when the process ends;
//! directories of processes that died (`kill -9`) are swept at the next start.

use std::{io, path::Path};

use tempfile::{NamedTempFile, TempDir};

#[derive(Debug)]
pub struct Spool {
    dir: TempDir,
}

impl Spool {
    /// This process's spool directory under `root`, after sweeping those of dead processes.
    pub fn open(root: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(root)?;
        sweep(root);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}.", std::process::id()))
            .tempdir_in(root)?;
        Ok(Self { dir })
    }

    /// A new, empty spool file (deleted when dropped).
    pub fn file(&self) -> io::Result<NamedTempFile> {
        tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(self.dir.path())
    }
}

/// Removes the directories (`{pid}.xxxx`) of processes no longer running.
fn sweep(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('.'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::info!(dir = %entry.path().display(), "removed the spool of a dead process")
                }
                Err(e) => {
                    tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove a stale spool")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn files_live_in_this_process_directory_and_dead_ones_are_swept() {
        let root = tempfile::tempdir().unwrap();
        // A dead process's leftovers (no process has pid 4194304 + 1: above pid_max).
        let stale = root.path().join("4194305.abc");
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("upload-x"), b"partial").unwrap();
        let spool = Spool::open(root.path()).unwrap();
        assert!(!stale.exists());
        let file = spool.file().unwrap();
        assert!(file.path().starts_with(spool.dir.path()));
        let dir = spool.dir.path().to_owned();
        drop(file);
        drop(spool);
        assert!(!dir.exists());
    }
}
