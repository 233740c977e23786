//! A null FUSE filesystem for benchmarks: one read-only file `zero` of SIZE bytes whose
//! reads are answered from a static buffer, mounted with the same options and worker
//! threads and kernel read-ahead as codexfs. Reading it measures the FUSE path alone.
//!
//! With SOURCE, reads are answered by pread(2) of SOURCE into a per-thread buffer instead:
//! the least any FUSE server that serves real bytes out of the page cache has to do.
//!
//! Usage: nullfs MOUNTPOINT SIZE_BYTES [THREADS [SOURCE]]; unmounts on SIGINT/SIGTERM.

use std::ffi::OsStr;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen,
    Request,
};

const BUF: [u8; 1 << 20] = [0u8; 1 << 20];

struct NullFs {
    size: u64,
    source: Option<std::fs::File>,
}

impl NullFs {
    fn attr(&self, ino: u64) -> FileAttr {
        let dir = ino == 1;
        FileAttr {
            ino: INodeNo(ino),
            size: if dir { 0 } else { self.size },
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if dir { 0o755 } else { 0o444 },
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }
}

impl Filesystem for NullFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name == "zero" {
            reply.entry(&Duration::from_secs(3600), &self.attr(2), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&Duration::from_secs(3600), &self.attr(ino.0));
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let n = (size as u64)
            .min(self.size.saturating_sub(offset))
            .min(BUF.len() as u64) as usize;
        let Some(source) = &self.source else {
            return reply.data(&BUF[..n]);
        };
        thread_local! {
            static READ_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 1 << 20]);
        }
        READ_BUF.with_borrow_mut(|buf| {
            use std::os::unix::fs::FileExt;
            match source.read_exact_at(&mut buf[..n], offset) {
                Ok(()) => reply.data(&buf[..n]),
                Err(_) => reply.error(Errno::EIO),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if offset == 0 {
            let _ = reply.add(INodeNo(2), 1, FileType::RegularFile, "zero");
        }
        reply.ok();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: nullfs MOUNTPOINT SIZE_BYTES [THREADS [SOURCE]]");
        std::process::exit(2);
    }
    let size: u64 = args[2].parse().expect("size in bytes");
    let threads: usize = args
        .get(3)
        .map(|t| t.parse().expect("threads"))
        .unwrap_or(8);
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("nullfs".into()), MountOption::RO];
    config.n_threads = Some(threads);
    config.clone_fd = true;
    let session = fuser::spawn_mount(
        NullFs {
            size,
            source: args
                .get(4)
                .map(|p| std::fs::File::open(p).expect("open SOURCE")),
        },
        &args[1],
        &config,
    )
    .expect("mount");
    // The same kernel read-ahead codexfs sets on its mounts, so the two compare fairly.
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(&args[1]).expect("stat mountpoint").dev();
    codexfs::fs::mount::set_readahead(dev, codexfs::fs::mount::READAHEAD_KB);
    eprintln!("nullfs: mounted at {}", args[1]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).unwrap();
        let mut int = signal(SignalKind::interrupt()).unwrap();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    });
    session.umount_and_join().expect("unmount");
}
