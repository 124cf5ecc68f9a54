//! `checksums.bin`: one CRC-32C (Castagnoli) per [`CHUNK_SIZE`] chunk of the data file.
//!
//! ```text
//! offset  size     field
//! 0       8        magic        "UMMCSUM1"
//! 8       4        chunk_size   u32 LE, = CHUNK_SIZE
//! 12      8        count        u64 LE, = ceil(data_len / chunk_size)
//! 20      4*count  crc[count]   u32 LE, CRC-32C of each chunk (the last may be short)
//! ```
//! Nothing follows the last CRC.

use std::io::Read;
use std::path::Path;

use super::{ImageError, CHUNK_SIZE};

/// The first 8 bytes of every checksum file.
pub(super) const MAGIC: &[u8; 8] = b"UMMCSUM1";
/// Magic, chunk size, count.
pub(super) const HEADER_LEN: u64 = 8 + 4 + 8;

/// Number of chunks of a data file of `data_len` bytes.
pub(super) fn chunk_count(data_len: u64) -> u64 {
    data_len.div_ceil(CHUNK_SIZE)
}

/// The whole file for these per-chunk CRCs.
pub(super) fn encode(sums: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN as usize + 4 * sums.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(CHUNK_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&(sums.len() as u64).to_le_bytes());
    for s in sums {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

fn err(path: &Path, detail: impl Into<String>) -> ImageError {
    ImageError::Checksums {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn io_err(path: &Path, e: std::io::Error) -> ImageError {
    ImageError::Io {
        path: path.to_path_buf(),
        err: e,
    }
}

/// Check the bytes of a whole checksum file (fetched, not read from disk) for a data file of
/// `data_len` bytes; `path` only names it in errors.
pub(super) fn decode(path: &Path, bytes: &[u8], data_len: u64) -> Result<Vec<u32>, ImageError> {
    let size = bytes.len() as u64;
    if size < HEADER_LEN {
        return Err(err(
            path,
            format!("{size} bytes, too short for the {HEADER_LEN}-byte header"),
        ));
    }
    if &bytes[..8] != MAGIC {
        return Err(err(path, "bad magic (expected \"UMMCSUM1\")"));
    }
    let chunk_size = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if u64::from(chunk_size) != CHUNK_SIZE {
        return Err(err(
            path,
            format!("chunk size {chunk_size} (expected {CHUNK_SIZE})"),
        ));
    }
    let count = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
    let expected = chunk_count(data_len);
    let want = HEADER_LEN + 4 * expected;
    if count != expected || size != want {
        return Err(err(
            path,
            format!(
                "{count} checksums in {size} bytes, but the {data_len}-byte data file has \
                 {expected} chunks ({want} bytes expected)"
            ),
        ));
    }
    Ok(bytes[HEADER_LEN as usize..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Read and check the checksum file of a data file of `data_len` bytes (already checked against
/// the data file's real size, so the table is at most 1/16384 of a real file).
pub(super) fn read(path: &Path, data_len: u64) -> Result<Vec<u32>, ImageError> {
    let (mut f, meta) = super::imp::open_readonly(path)?;
    if !meta.is_file() {
        return Err(err(path, "not a regular file"));
    }
    let size = meta.len();
    if size < HEADER_LEN {
        return Err(err(
            path,
            format!("{size} bytes, too short for the {HEADER_LEN}-byte header"),
        ));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    f.read_exact(&mut header).map_err(|e| io_err(path, e))?;
    if &header[..8] != MAGIC {
        return Err(err(
            path,
            format!(
                "bad magic {:?} (expected \"UMMCSUM1\")",
                String::from_utf8_lossy(&header[..8])
            ),
        ));
    }
    let chunk_size = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
    if u64::from(chunk_size) != CHUNK_SIZE {
        return Err(err(
            path,
            format!("chunk size {chunk_size} (expected {CHUNK_SIZE})"),
        ));
    }
    let count = u64::from_le_bytes(header[12..20].try_into().unwrap_or_default());
    let expected = chunk_count(data_len);
    if count != expected {
        return Err(err(
            path,
            format!("{count} checksums, but the {data_len}-byte data file has {expected} chunks"),
        ));
    }
    let want = HEADER_LEN + 4 * expected;
    if size != want {
        return Err(err(
            path,
            format!("{size} bytes, expected {want} (header and {expected} checksums)"),
        ));
    }
    let mut table = vec![0u8; (4 * expected) as usize];
    f.read_exact(&mut table).map_err(|e| io_err(path, e))?;
    // The size was checked above; a file that grew since is not the file that was checked.
    if f.read(&mut [0u8; 1]).map_err(|e| io_err(path, e))? != 0 {
        return Err(err(path, "the file grew while it was read"));
    }
    Ok(table
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}
