//! Reads the table of contents of a CUDA fatbin, so tests and error messages can say which
//! architectures a build carries without a GPU or cuobjdump.
//!
//! Layout (little-endian), as nvcc 12 and 13 write it:
//! - header, 16 bytes: magic `0xBA55ED50` (u32), version (u16), header size (u16), size of the
//!   entries that follow (u64);
//! - entries, back to back: kind (u16: 1 = PTX, 2 = ELF/SASS), version (u16), entry header size
//!   (u32), payload size padded (u64), ..., the target architecture (u32 at byte 28, e.g. 90);
//!   the payload follows the entry header.

/// What a fatbin entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FatbinEntry {
    /// PTX for `compute_XX`, JIT-compiled by the driver.
    Ptx(u32),
    /// Machine code (SASS, in an ELF cubin) for `sm_XX`.
    Sass(u32),
}

const MAGIC: u32 = 0xBA55_ED50;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The entries of a fatbin, in file order; Err describes what is malformed.
pub fn fatbin_entries(bytes: &[u8]) -> Result<Vec<FatbinEntry>, String> {
    let short = || "fatbin is truncated".to_string();
    let magic = u32_at(bytes, 0).ok_or_else(short)?;
    if magic != MAGIC {
        return Err(format!(
            "not a fatbin (magic {magic:#010x}, expected {MAGIC:#010x})"
        ));
    }
    let header = u16_at(bytes, 6).ok_or_else(short)? as usize;
    let size = u64_at(bytes, 8).ok_or_else(short)?;
    let end = header
        .checked_add(usize::try_from(size).map_err(|_| short())?)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(short)?;
    let mut at = header;
    let mut entries = Vec::new();
    while at < end {
        let kind = u16_at(bytes, at).ok_or_else(short)?;
        let entry_header = u32_at(bytes, at + 4).ok_or_else(short)? as usize;
        let payload = u64_at(bytes, at + 8).ok_or_else(short)?;
        let arch = u32_at(bytes, at + 28).ok_or_else(short)?;
        entries.push(match kind {
            1 => FatbinEntry::Ptx(arch),
            2 => FatbinEntry::Sass(arch),
            k => return Err(format!("fatbin entry of unknown kind {k} at byte {at}")),
        });
        let step = entry_header
            .checked_add(usize::try_from(payload).map_err(|_| short())?)
            .filter(|&s| s >= 32)
            .ok_or_else(|| format!("fatbin entry at byte {at} has a bad size"))?;
        at = at.checked_add(step).ok_or_else(short)?;
    }
    if at != end {
        return Err(short());
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fatbin made by hand: header plus entries of (kind, arch, payload length).
    fn synthetic(entries: &[(u16, u32, usize)]) -> Vec<u8> {
        let mut body = Vec::new();
        for &(kind, arch, len) in entries {
            let mut h = vec![0u8; 64];
            h[0..2].copy_from_slice(&kind.to_le_bytes());
            h[2..4].copy_from_slice(&0x0101u16.to_le_bytes());
            h[4..8].copy_from_slice(&64u32.to_le_bytes());
            h[8..16].copy_from_slice(&(len as u64).to_le_bytes());
            h[28..32].copy_from_slice(&arch.to_le_bytes());
            body.extend_from_slice(&h);
            body.extend(std::iter::repeat_n(0xAB, len));
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&16u16.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn reads_ptx_and_sass_entries() {
        let f = synthetic(&[(1, 80, 104), (2, 80, 24), (2, 90, 0)]);
        assert_eq!(
            fatbin_entries(&f).unwrap(),
            vec![
                FatbinEntry::Ptx(80),
                FatbinEntry::Sass(80),
                FatbinEntry::Sass(90)
            ]
        );
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert!(fatbin_entries(b"").is_err());
        assert!(fatbin_entries(b"\x7fELF and so on, not a fatbin").is_err());
        let f = synthetic(&[(2, 86, 40)]);
        for cut in [4, 16, 40, f.len() - 1] {
            assert!(fatbin_entries(&f[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad_kind = f.clone();
        bad_kind[16] = 7;
        assert!(fatbin_entries(&bad_kind).is_err());
    }

    /// The fatbins this build embedded hold SASS for exactly the built archs, and the PTX.
    #[test]
    fn embedded_fatbins_hold_the_built_architectures() {
        for (name, bytes) in super::super::FATBINS {
            let entries = fatbin_entries(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut sass: Vec<String> = entries
                .iter()
                .filter_map(|e| match e {
                    FatbinEntry::Sass(a) => Some(format!("sm_{a}")),
                    _ => None,
                })
                .collect();
            sass.sort();
            sass.dedup();
            let mut want: Vec<String> = super::super::CUDA_ARCHS
                .iter()
                .map(|a| a.trim_end_matches(['a', 'f']).to_string())
                .collect();
            want.sort();
            assert_eq!(sass, want, "{name}");
            let ptx: Vec<u32> = entries
                .iter()
                .filter_map(|e| match e {
                    FatbinEntry::Ptx(a) => Some(*a),
                    _ => None,
                })
                .collect();
            assert_eq!(
                ptx.iter()
                    .map(|a| format!("compute_{a}"))
                    .collect::<Vec<_>>(),
                vec![super::super::CUDA_PTX_ARCH.to_string()],
                "{name}"
            );
        }
    }
}
