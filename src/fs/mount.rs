//! Mounting: prepares the mountpoint (recovering a stale one), runs the FUSE session on
//! worker threads, and unmounts cleanly on request, publishing what is being written.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption};

use super::core::FsCore;
use super::fuse::CodexFuse;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct MountConfig {
    pub mountpoint: PathBuf,
    /// FUSE worker threads (requests are served concurrently).
    pub threads: usize,
    /// Reads of complete datasets by FUSE passthrough (when the kernel and the privileges
    /// allow it); otherwise every read is served by the daemon.
    pub passthrough: bool,
}

/// A live mount; [`Mounted::unmount`] ends it.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    core: Arc<FsCore>,
    publisher: Option<std::thread::JoinHandle<()>>,
    mountpoint: PathBuf,
    device: Option<u64>,
}

/// Makes sure `mountpoint` is a directory we can mount on: creates it if missing and
/// detaches a mount left behind by a crashed process (stat fails with ENOTCONN).
pub fn prepare_mountpoint(mountpoint: &Path) -> Result<()> {
    // Right after the crash the kernel may still answer stat from its cache; statfs always
    // asks the (dead) daemon.
    let dead = is_mountpoint(mountpoint) && statfs_errno(mountpoint) == Some(libc::ENOTCONN);
    let stat = match dead {
        true => Err(std::io::Error::from_raw_os_error(libc::ENOTCONN)),
        false => std::fs::metadata(mountpoint),
    };
    match stat {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::InvalidArgument(format!(
            "{} is not a directory",
            mountpoint.display()
        ))),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::warn!(
                "{} was left mounted by a process that died; unmounting it",
                mountpoint.display()
            );
            eprintln!(
                "codexfs: recovered a stale mount at {}",
                mountpoint.display()
            );
            detach(mountpoint)?;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(mountpoint)?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The errno statfs(2) of `path` fails with, if it does.
fn statfs_errno(path: &Path) -> Option<i32> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: a valid C string and a zeroed struct for the kernel to fill.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    match unsafe { libc::statfs(c.as_ptr(), &mut buf) } {
        0 => None,
        _ => std::io::Error::last_os_error().raw_os_error(),
    }
}

fn detach(mountpoint: &Path) -> Result<()> {
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::InvalidArgument("mountpoint has a NUL byte".into()))?;
    // SAFETY: a valid C string; MNT_DETACH only detaches.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = std::io::Error::last_os_error();
        // Not root: fall back to fusermount3, which may unmount user mounts.
        let ok = std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(mountpoint)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err(Error::Io(e));
        }
    }
    Ok(())
}

/// Whether something is already mounted at `path` (per /proc/self/mountinfo).
fn is_mountpoint(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(|p| Path::new(p) == canon)
            .unwrap_or(false)
    })
}

pub fn mount(core: Arc<FsCore>, config: &MountConfig) -> Result<Mounted> {
    prepare_mountpoint(&config.mountpoint)?;
    if is_mountpoint(&config.mountpoint) {
        return Err(Error::InvalidArgument(format!(
            "{} is already a mountpoint (another codexfs?)",
            config.mountpoint.display()
        )));
    }
    let mut fuse_config = Config::default();
    fuse_config.mount_options = vec![
        MountOption::FSName("codexfs".into()),
        MountOption::Subtype("codexfs".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    fuse_config.n_threads = Some(config.threads.max(1));
    fuse_config.clone_fd = true;
    // Directory trees written into the mount publish themselves once quiet.
    let publisher = core.spawn_publisher();
    let session = fuser::spawn_mount(
        CodexFuse::new(core.clone(), config.passthrough),
        &config.mountpoint,
        &fuse_config,
    )?;
    let device = std::fs::metadata(&config.mountpoint).ok().map(|m| m.dev());
    if let Some(dev) = device {
        set_readahead(dev, READAHEAD_KB);
    }
    Ok(Mounted {
        session: Some(session),
        core,
        publisher: Some(publisher),
        mountpoint: config.mountpoint.clone(),
        device,
    })
}

impl Mounted {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Whether the FUSE session has ended: someone unmounted the mountpoint (`umount`,
    /// `fusermount3 -u`) or the connection was aborted.
    pub fn ended(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Publishes open writers, unmounts, and waits for the session to end. Files still
    /// open elsewhere lose the mount (their reads fail) rather than keep it alive.
    pub fn unmount(mut self) -> Result<()> {
        self.core.flush_all();
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let r = self.end_session(session);
        self.core.unmounted();
        // It stops at its next round now; the core is not to outlive this in it.
        if let Some(p) = self.publisher.take() {
            let _ = p.join();
        }
        r
    }

    fn end_session(&self, session: fuser::BackgroundSession) -> Result<()> {
        if session.guard.is_finished() {
            // Unmounted from outside: nothing left to unmount.
            if let Err(e) = session.join() {
                tracing::debug!("FUSE session ended with {e}");
            }
            return Ok(());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(session.umount_and_join());
        });
        let busy = match rx.recv_timeout(Duration::from_secs(3)) {
            Ok(Ok(())) => return Ok(()),
            // Files are still open on the mount: a plain unmount is refused.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EBUSY) => true,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => false, // the session did not end: something holds it
        };
        tracing::info!(
            busy,
            "files still open at unmount: detaching and aborting the connection"
        );
        let _ = detach(&self.mountpoint);
        if let Some(dev) = self.device {
            abort_connection(dev);
        }
        if !busy {
            // The join is still under way; give it a moment after the abort.
            let _ = rx.recv_timeout(Duration::from_secs(5));
        }
        // The session's threads end once the connection is aborted and let go of the core:
        // wait for that (a while at most), so that the repo closes here and not in one of
        // them as the process exits (RocksDB aborts when its statics go first).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.core) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.core.flush_all();
            drop(session); // unmounts
            self.core.unmounted();
            if let Some(p) = self.publisher.take() {
                let _ = p.join();
            }
        }
    }
}

/// Kernel read-ahead for the mount, in KiB. FUSE starts at 128 KiB, which makes a
/// sequential reader pay one request per 128 KiB; 1 MiB is the largest request FUSE sends.
pub const READAHEAD_KB: u32 = 1024;

/// Sets the read-ahead of the mount whose device is `dev` (root only; otherwise the
/// kernel's default stays).
pub fn set_readahead(dev: u64, kb: u32) {
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    if let Err(e) = std::fs::write(&path, kb.to_string()) {
        tracing::debug!("could not set read-ahead in {path}: {e}");
    }
}

/// Writes to /sys/fs/fuse/connections/<minor>/abort (mounting fusectl if needed).
fn abort_connection(dev: u64) {
    let minor = libc::minor(dev);
    let dir = Path::new("/sys/fs/fuse/connections");
    let abort = dir.join(minor.to_string()).join("abort");
    if !abort.exists() {
        let (src, target, fstype) = (c"fusectl", c"/sys/fs/fuse/connections", c"fusectl");
        // SAFETY: constant C strings; failure is handled by the write below failing.
        unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
    }
    if let Err(e) = std::fs::write(&abort, b"1") {
        tracing::warn!("could not abort FUSE connection {minor}: {e}");
    }
}
