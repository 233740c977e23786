//! In-memory Reed–Solomon throughput of codexfs's column codec over a whole dataset, on
//! all cores: encode every column (K data → M parity), then decode every column with M of
//! its data blocks lost. Figures are original (data) bytes per second. Used by
//! `scripts/bench-ec`.
//!
//! Usage: ec_codec [SIZE_MIB (1024)] [K (10)] [M (4)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use codexfs::erasure::codec::ColumnCodec;
use codexfs::erasure::Layout;

const BS: usize = 65536;

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a number"))
        .collect();
    let size_mib = args.first().copied().unwrap_or(1024);
    let (k, m) = (
        args.get(1).copied().unwrap_or(10),
        args.get(2).copied().unwrap_or(4),
    );
    let n = (size_mib << 20) / BS as u64;
    let layout = Layout::new(n, k, m);
    // Reproducible, incompressible-looking data (xorshift).
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let blocks: Vec<Bytes> = (0..layout.rounded)
        .map(|i| {
            if i >= n {
                return Bytes::from(vec![0u8; BS]);
            }
            let mut v = Vec::with_capacity(BS);
            for _ in 0..BS / 8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.extend_from_slice(&x.to_le_bytes());
            }
            Bytes::from(v)
        })
        .collect();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let parity: Vec<std::sync::Mutex<Vec<Bytes>>> =
        (0..layout.steps).map(|_| Default::default()).collect();

    let next = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut codec = ColumnCodec::new(k as usize, m as usize, BS).unwrap();
                loop {
                    let step = next.fetch_add(1, Ordering::Relaxed);
                    if step >= layout.steps {
                        return;
                    }
                    let data: Vec<&Bytes> = (0..k as usize)
                        .map(|r| &blocks[layout.member(step, r) as usize])
                        .collect();
                    let p = codec.encode(&data).unwrap();
                    *parity[step as usize].lock().unwrap() =
                        p.into_iter().map(Bytes::from).collect();
                }
            });
        }
    });
    let encode = t.elapsed().as_secs_f64();

    let next = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut codec = ColumnCodec::new(k as usize, m as usize, BS).unwrap();
                loop {
                    let step = next.fetch_add(1, Ordering::Relaxed);
                    if step >= layout.steps {
                        return;
                    }
                    let p = parity[step as usize].lock().unwrap().clone();
                    let mut shards: Vec<Option<Bytes>> = (0..k as usize)
                        .map(|r| Some(blocks[layout.member(step, r) as usize].clone()))
                        .chain(p.into_iter().map(Some))
                        .collect();
                    // the worst case: M data blocks lost
                    for s in shards.iter_mut().take(m.min(k) as usize) {
                        *s = None;
                    }
                    codec.reconstruct(&mut shards).unwrap();
                    let r0 = shards[0].as_ref().unwrap();
                    assert!(
                        r0 == &blocks[layout.member(step, 0) as usize],
                        "decode differs"
                    );
                }
            });
        }
    });
    let decode = t.elapsed().as_secs_f64();
    let bytes = (n as usize * BS) as f64;
    println!(
        "ec_codec {size_mib} MiB K={k} M={m} threads={threads} encode {:.2} GB/s decode {:.2} GB/s",
        bytes / encode / 1e9,
        bytes / decode / 1e9
    );
}
