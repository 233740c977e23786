//! One column's Reed–Solomon code (reed-solomon-simd, a Leopard-style GF(2^16) code): K
//! data shards in, M parity shards out; any K of the K+M rebuild the rest. The coder keeps
//! its working space between columns, so one per thread is enough.

use bytes::Bytes;
use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

use crate::error::{Error, Result};

fn rs_error(e: reed_solomon_simd::Error) -> Error {
    Error::InvalidArgument(format!("Reed–Solomon: {e}"))
}

/// The crate needs an even shard size; the block size is the shard size.
pub fn check_block_size(block_size: u64) -> Result<()> {
    if block_size == 0 || block_size % 2 != 0 {
        return Err(Error::InvalidArgument(format!(
            "erasure coding needs an even block size, not {block_size}"
        )));
    }
    Ok(())
}

pub struct ColumnCodec {
    k: usize,
    m: usize,
    shard_bytes: usize,
    encoder: Option<ReedSolomonEncoder>,
    decoder: Option<ReedSolomonDecoder>,
}

impl ColumnCodec {
    pub fn new(k: usize, m: usize, shard_bytes: usize) -> Result<Self> {
        check_block_size(shard_bytes as u64)?;
        if !ReedSolomonEncoder::supports(k, m) {
            return Err(Error::InvalidArgument(format!(
                "erasure coding {k},{m} is not supported"
            )));
        }
        Ok(Self {
            k,
            m,
            shard_bytes,
            encoder: None,
            decoder: None,
        })
    }

    /// The M parity shards of K data shards.
    pub fn encode<T: AsRef<[u8]>>(&mut self, data: &[T]) -> Result<Vec<Vec<u8>>> {
        if data.len() != self.k {
            return Err(Error::InvalidArgument(format!(
                "{} data shards for a {}-shard code",
                data.len(),
                self.k
            )));
        }
        let (k, m, bytes) = (self.k, self.m, self.shard_bytes);
        let enc = match &mut self.encoder {
            Some(e) => {
                e.reset(k, m, bytes).map_err(rs_error)?;
                e
            }
            slot => slot.insert(ReedSolomonEncoder::new(k, m, bytes).map_err(rs_error)?),
        };
        for d in data {
            enc.add_original_shard(d).map_err(rs_error)?;
        }
        let result = enc.encode().map_err(rs_error)?;
        Ok(result.recovery_iter().map(<[u8]>::to_vec).collect())
    }

    /// Fills in every missing shard of a column (rows 0..K data, K..K+M parity) from the
    /// ones present; fails if fewer than K are.
    pub fn reconstruct(&mut self, shards: &mut [Option<Bytes>]) -> Result<()> {
        let (k, m, bytes) = (self.k, self.m, self.shard_bytes);
        if shards.len() != k + m {
            return Err(Error::InvalidArgument(format!(
                "{} shards for a {k}+{m} code",
                shards.len()
            )));
        }
        let present = shards.iter().filter(|s| s.is_some()).count();
        if present < k {
            return Err(Error::InvalidArgument(format!(
                "{present} shards of a {k}+{m} code, {k} needed"
            )));
        }
        if let Some(s) = shards.iter().flatten().find(|s| s.len() != bytes) {
            return Err(Error::InvalidArgument(format!(
                "a shard of {} bytes, {bytes} expected",
                s.len()
            )));
        }
        if shards[..k].iter().any(Option::is_none) {
            let dec = match &mut self.decoder {
                Some(d) => {
                    d.reset(k, m, bytes).map_err(rs_error)?;
                    d
                }
                slot => slot.insert(ReedSolomonDecoder::new(k, m, bytes).map_err(rs_error)?),
            };
            for (row, s) in shards.iter().enumerate() {
                match s {
                    Some(s) if row < k => dec.add_original_shard(row, s).map_err(rs_error)?,
                    Some(s) => dec.add_recovery_shard(row - k, s).map_err(rs_error)?,
                    None => {}
                }
            }
            let result = dec.decode().map_err(rs_error)?;
            let mut restored = Vec::new();
            for (row, s) in shards[..k].iter().enumerate() {
                if s.is_none() {
                    let data = result.restored_original(row).ok_or_else(|| {
                        Error::Corrupt(format!("Reed–Solomon did not restore row {row}"))
                    })?;
                    restored.push((row, Bytes::copy_from_slice(data)));
                }
            }
            drop(result);
            for (row, data) in restored {
                shards[row] = Some(data);
            }
        }
        if shards[k..].iter().any(Option::is_none) {
            let data: Vec<Bytes> = shards[..k].iter().flatten().cloned().collect();
            let parity = self.encode(&data)?;
            for (j, p) in parity.into_iter().enumerate() {
                if shards[k + j].is_none() {
                    shards[k + j] = Some(Bytes::from(p));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{seq::SliceRandom, Rng, RngCore, SeedableRng};

    fn column(rng: &mut impl RngCore, k: usize, bytes: usize) -> Vec<Vec<u8>> {
        (0..k)
            .map(|_| {
                let mut v = vec![0u8; bytes];
                rng.fill_bytes(&mut v);
                v
            })
            .collect()
    }

    #[test]
    fn any_k_of_k_plus_m_rebuild_the_column_for_k_and_m_up_to_16() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let bytes = 128;
        for k in 1..=16 {
            for m in 1..=16 {
                let mut codec = ColumnCodec::new(k, m, bytes).unwrap();
                let data = column(&mut rng, k, bytes);
                let parity = codec.encode(&data).unwrap();
                assert_eq!(parity.len(), m);
                let full: Vec<Bytes> = data
                    .iter()
                    .chain(&parity)
                    .map(|v| Bytes::from(v.clone()))
                    .collect();
                // a few random loss patterns of every size up to M
                for lost in 0..=m {
                    for _ in 0..3 {
                        let mut rows: Vec<usize> = (0..k + m).collect();
                        rows.shuffle(&mut rng);
                        let mut shards: Vec<Option<Bytes>> =
                            full.iter().cloned().map(Some).collect();
                        for &r in &rows[..lost] {
                            shards[r] = None;
                        }
                        codec.reconstruct(&mut shards).unwrap();
                        let got: Vec<Bytes> = shards.into_iter().map(Option::unwrap).collect();
                        assert!(got == full, "k={k} m={m} lost {:?}", &rows[..lost]);
                    }
                }
                // M+1 losses cannot be rebuilt
                let mut shards: Vec<Option<Bytes>> = full.iter().cloned().map(Some).collect();
                for s in shards.iter_mut().take(m + 1) {
                    *s = None;
                }
                assert!(codec.reconstruct(&mut shards).is_err());
            }
        }
    }

    #[test]
    fn zero_data_has_zero_parity_and_odd_sizes_are_refused() {
        let mut codec = ColumnCodec::new(4, 2, 64).unwrap();
        let parity = codec.encode(&vec![vec![0u8; 64]; 4]).unwrap();
        assert!(parity.iter().all(|p| p.iter().all(|&b| b == 0)));
        assert!(ColumnCodec::new(4, 2, 63).is_err());
        assert!(codec.encode(&vec![vec![0u8; 64]; 3]).is_err());
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut shards = vec![Some(Bytes::from(vec![rng.random::<u8>(); 64])); 6];
        shards[0] = Some(Bytes::from(vec![0u8; 32]));
        assert!(codec.reconstruct(&mut shards).is_err());
    }
}
