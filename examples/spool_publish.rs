//! The costs of the passthrough-spool design for `cp` into the mount (issue 16, item 5),
//! measured without the kernel: the copy into a spool file in the data dir (what the kernel
//! would do for a passthrough write, at plain-file speed), then `Node::store_file_in_place`
//! (hash on every core where it is, sync, rename to the flat file). Prints both times.
//!
//! Usage: spool_publish DATA_DIR SOURCE_FILE

use std::io::{Read, Write};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (data, src) = (std::path::Path::new(&args[1]), &args[2]);
    let node = codexfs::node::Node::open(data, Default::default()).expect("open the data dir");
    let spool_dir = data.join("spool");
    std::fs::create_dir_all(&spool_dir).unwrap();
    let spool = spool_dir.join("bench.spool");
    let t = Instant::now();
    {
        let mut input = std::fs::File::open(src).unwrap();
        let mut out = std::fs::File::create(&spool).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).unwrap();
        }
    }
    let write = t.elapsed();
    let t = Instant::now();
    let (cid, size) = node
        .store_file_in_place(&spool, Some("random.bin".into()), None, None)
        .unwrap();
    let publish = t.elapsed();
    println!(
        "{} {size} write {:.3} publish {:.3} total {:.3}",
        codexfs::cids::cid_string(&cid),
        write.as_secs_f64(),
        publish.as_secs_f64(),
        (write + publish).as_secs_f64()
    );
}
