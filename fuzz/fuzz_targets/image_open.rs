//! The image opener (`Image::open`) on a small image directory built from the input, then the
//! reads the manager makes of an opened image (`data` for every run, `verify_all`).
//!
//! Input: `mode:u8 tweak:u16le manifest-text [0x00 checksums-len:u16le checksums pages]`.
//! The manifest is written as given. `pages.img` and `checksums.bin` are generated to match
//! it (when it parses and asks for at most 1 MiB of data), unless `mode` says to take them from
//! the input, leave them out, resize them by `tweak`, or flip a byte at `tweak`.
//!
//! Checks, besides "never panics": an image that opens carries exactly the parsed manifest;
//! reads of generated, untouched data return those bytes; a flipped data or checksum byte is
//! reported as `Corrupt` by the reads and never returned as data.
#![no_main]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use umm::image::{
    Image, ImageError, Manifest, CHECKSUM_FILE, CHUNK_SIZE, DATA_FILE, MANIFEST_FILE,
};

const RAW_PAGES: u8 = 1 << 0;
const RAW_SUMS: u8 = 1 << 1;
const FLIP_PAGE_BYTE: u8 = 1 << 2;
const FLIP_SUM_BYTE: u8 = 1 << 3;
const NO_PAGES: u8 = 1 << 4;
const NO_SUMS: u8 = 1 << 5;
const RESIZE_PAGES: u8 = 1 << 6;
const RESIZE_SUMS: u8 = 1 << 7;

/// Largest data file generated for a manifest (larger ones are left short: a size error).
const MAX_GENERATED: u64 = 1 << 20;

/// One directory per fuzzing process (tmpfs when there is one), made for every input and
/// removed after it: libFuzzer ends the process with exit(), so nothing would clean up later.
/// An input that fails a check leaves it behind, for a look.
struct ScratchDir(&'static Path);

impl ScratchDir {
    fn new() -> ScratchDir {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        let dir = DIR.get_or_init(|| {
            let base = Path::new("/dev/shm");
            let base = if base.is_dir() {
                base.to_path_buf()
            } else {
                std::env::temp_dir()
            };
            base.join(format!("umm-fuzz-image-{}", std::process::id()))
        });
        fs::create_dir_all(dir).expect("scratch directory");
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(self.0);
    }
}

/// `checksums.bin` for `data`, as umm-image(5) describes it.
fn checksum_file(data: &[u8]) -> Vec<u8> {
    let chunks: Vec<&[u8]> = data.chunks(CHUNK_SIZE as usize).collect();
    let mut out = b"UMMCSUM1".to_vec();
    out.extend_from_slice(&(CHUNK_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&(chunks.len() as u64).to_le_bytes());
    for c in chunks {
        out.extend_from_slice(&crc32c::crc32c(c).to_le_bytes());
    }
    out
}

fn resize(v: &mut Vec<u8>, tweak: u16) {
    // Low bit: shrink or grow; the rest: by how much.
    let by = usize::from(tweak >> 1);
    if tweak & 1 == 0 {
        v.truncate(v.len().saturating_sub(by.max(1)));
    } else {
        v.resize(v.len() + by.max(1), 0x5a);
    }
}

fn flip(v: &mut [u8], at: u16) -> bool {
    if v.is_empty() {
        return false;
    }
    let i = usize::from(at) * 97 % v.len();
    v[i] ^= 0x01;
    true
}

fn write_or_remove(path: &Path, bytes: Option<&[u8]>) {
    let _ = fs::remove_file(path);
    if let Some(b) = bytes {
        fs::write(path, b).expect("write scratch file");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((header, rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let mode = header[0];
    let tweak = u16::from_le_bytes([header[1], header[2]]);
    let (manifest_text, raw) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let (raw_sums, raw_pages) = match raw.split_first_chunk::<2>() {
        Some((n, tail)) => tail.split_at(usize::from(u16::from_le_bytes(*n)).min(tail.len())),
        None => (&[][..], &[][..]),
    };

    let parsed = Manifest::parse(Path::new(MANIFEST_FILE), manifest_text).ok();
    let data_len = parsed.as_ref().map_or(0, |m| m.data_len);
    let generated: Vec<u8> = if data_len <= MAX_GENERATED {
        (0..data_len)
            .map(|i| (i.wrapping_mul(31) >> 3) as u8 ^ mode)
            .collect()
    } else {
        Vec::new()
    };

    let mut pages = if mode & RAW_PAGES != 0 {
        raw_pages.to_vec()
    } else {
        generated.clone()
    };
    let mut sums = if mode & RAW_SUMS != 0 {
        raw_sums.to_vec()
    } else {
        checksum_file(&pages)
    };
    // What the image serves can differ from what its checksums cover only through a flip.
    let mut flipped = false;
    if mode & FLIP_PAGE_BYTE != 0 {
        flipped |= flip(&mut pages, tweak);
    }
    if mode & FLIP_SUM_BYTE != 0 {
        flipped |= flip(&mut sums, tweak);
    }
    if mode & RESIZE_PAGES != 0 {
        resize(&mut pages, tweak);
    }
    if mode & RESIZE_SUMS != 0 {
        resize(&mut sums, tweak);
    }

    let scratch = ScratchDir::new();
    let dir = scratch.0;
    write_or_remove(&dir.join(MANIFEST_FILE), Some(manifest_text));
    write_or_remove(
        &dir.join(DATA_FILE),
        (mode & NO_PAGES == 0).then_some(&pages[..]),
    );
    write_or_remove(
        &dir.join(CHECKSUM_FILE),
        (mode & NO_SUMS == 0).then_some(&sums[..]),
    );

    let image = match Image::open(dir) {
        Ok(image) => image,
        Err(e) => {
            assert!(
                !matches!(e, ImageError::Corrupt { .. }),
                "open verified data: {e}"
            );
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let m = image.manifest();
    assert_eq!(
        Some(m),
        parsed.as_ref(),
        "opened image's manifest differs from the parsed one"
    );
    assert_eq!(pages.len() as u64, m.data_len);
    // Checksums computed from the data file as it was written.
    let clean = mode & (RAW_SUMS | RESIZE_PAGES | RESIZE_SUMS) == 0 && !flipped;

    for run in m.regions.iter().flat_map(|r| r.runs.iter()) {
        match image.data(run.data_offset, run.len) {
            Ok(bytes) => {
                let at = run.data_offset as usize;
                assert_eq!(bytes, &pages[at..at + bytes.len()]);
                if mode & (RAW_PAGES | RESIZE_PAGES) == 0 && !flipped {
                    assert_eq!(bytes, &generated[at..at + bytes.len()]);
                }
            }
            Err(ImageError::Corrupt { .. }) => assert!(!clean, "clean image reported corrupt"),
            Err(e) => panic!("reading run {run:?} of an opened image: {e}"),
        }
    }
    match image.verify_all() {
        Ok(()) => {}
        Err(ImageError::Corrupt { .. }) => assert!(!clean, "clean image reported corrupt"),
        Err(e) => panic!("verify_all: {e}"),
    }
    assert!(image.data(m.data_len, 0).is_ok_and(|b| b.is_empty()));
    assert!(image.data(m.data_len, 1).is_err());
    assert!(image.data(u64::MAX, 2).is_err());
});
