//! Unit tests: a written image round-trips; every validation rule refuses what it should with
//! the error it should; corruption is caught per chunk.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::*;
use crate::PAGE_SIZE;

const P: u64 = PAGE_SIZE;

/// A fresh directory under the system temp dir, removed on drop.
pub(super) struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "umm-image-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside this directory that does not exist yet.
    pub(super) fn sub(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Recognizable page contents: every byte depends on its address and `seed`.
pub(super) fn pattern(addr: u64, len: u64, seed: u8) -> Vec<u8> {
    (addr..addr + len)
        .map(|a| ((a.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 29) as u8) ^ seed)
        .collect()
}

/// What the sample image holds: (address, bytes) of every written stretch.
struct Sample {
    manifest: Manifest,
    written: Vec<(u64, Vec<u8>)>,
}

const R0: u64 = 0x10000;
const R1: u64 = R0 + 64 * P;
const STACK: u64 = 0x7fff_f000_0000;

/// Three regions: one with holes and a 40-page run across chunk boundaries (written in pieces
/// that join into one run), one touching it with no data at all, one near the top of the
/// address space ending in a populated page. 47 pages of data: three chunks, the last short.
fn write_sample(dir: &Path) -> Sample {
    let mut w = ImageWriter::create(dir, 4242, "/usr/bin/sample").unwrap();
    let mut written = Vec::new();
    let mut put = |w: &mut ImageWriter, addr: u64, pages: u64| {
        let bytes = pattern(addr, pages * P, 0);
        w.write_pages(addr, &bytes).unwrap();
        written.push((addr, bytes));
    };
    w.begin_region(R0, 64 * P, 3, &["private", "anonymous"], "")
        .unwrap();
    put(&mut w, R0, 3);
    put(&mut w, R0 + 5 * P, 1);
    put(&mut w, R0 + 6 * P, 30);
    put(&mut w, R0 + 36 * P, 9);
    put(&mut w, R0 + 63 * P, 1);
    w.begin_region(R1, 16 * P, 1, &["heap"], "[heap]").unwrap();
    w.begin_region(STACK, 8 * P, 7, &["stack", "growsdown"], "[stack]")
        .unwrap();
    put(&mut w, STACK + 5 * P, 3);
    let manifest = w.finish().unwrap();
    Sample { manifest, written }
}

fn read_json(dir: &Path) -> Value {
    serde_json::from_slice(&fs::read(dir.join(MANIFEST_FILE)).unwrap()).unwrap()
}

fn write_json(dir: &Path, v: &Value) {
    fs::write(
        dir.join(MANIFEST_FILE),
        serde_json::to_vec_pretty(v).unwrap(),
    )
    .unwrap();
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut Value)) {
    let mut v = read_json(dir);
    f(&mut v);
    write_json(dir, &v);
}

fn hex(v: u64) -> Value {
    Value::String(format!("{v:#x}"))
}

/// A sample image with `f` applied to its manifest, opened: the error it gives.
fn open_edited(f: impl FnOnce(&mut Value)) -> ImageError {
    let t = TempDir::new("edit");
    write_sample(t.path());
    edit_manifest(t.path(), f);
    let e = Image::open(t.path()).unwrap_err();
    // Every error names a file inside the image and renders to one line.
    let text = e.to_string();
    assert!(text.contains(t.path().to_str().unwrap()), "{text}");
    assert!(!text.contains('\n'), "{text}");
    e
}

fn detail(e: &ImageError) -> &str {
    match e {
        ImageError::Manifest { detail, .. }
        | ImageError::Invalid { detail, .. }
        | ImageError::Checksums { detail, .. } => detail,
        ImageError::Version { found, .. } => found,
        _ => "",
    }
}

#[track_caller]
fn assert_manifest_err(e: &ImageError, needle: &str) {
    assert!(
        matches!(e, ImageError::Manifest { path, .. } if path.ends_with(MANIFEST_FILE)),
        "{e:?}"
    );
    assert!(detail(e).contains(needle), "{needle:?} not in {e}");
}

#[track_caller]
fn assert_invalid(e: &ImageError, needle: &str) {
    assert!(
        matches!(e, ImageError::Invalid { path, .. } if path.ends_with(MANIFEST_FILE)),
        "{e:?}"
    );
    assert!(detail(e).contains(needle), "{needle:?} not in {e}");
}

// ---- round trip ---------------------------------------------------------------------------

#[test]
fn round_trip_returns_exactly_the_written_pages_and_manifest() {
    let t = TempDir::new("roundtrip");
    let s = write_sample(t.path());
    let img = Image::open(t.path()).unwrap();
    assert_eq!(img.manifest(), &s.manifest);
    assert_eq!(img.dir(), t.path());

    let m = img.manifest();
    assert_eq!(m.version, FORMAT_VERSION);
    assert_eq!((m.page_size, m.chunk_size), (PAGE_SIZE, CHUNK_SIZE));
    assert_eq!(m.data_len, 47 * P);
    assert_eq!(
        (m.source_pid, m.source_exe.as_str()),
        (4242, "/usr/bin/sample")
    );
    assert!(m.created_unix > 1_600_000_000);
    assert_eq!(m.regions.len(), 3);
    // Adjacent writes joined into one run; holes split runs.
    assert_eq!(
        m.regions[0].runs,
        vec![
            DataRun {
                offset: 0,
                len: 3 * P,
                data_offset: 0
            },
            DataRun {
                offset: 5 * P,
                len: 40 * P,
                data_offset: 3 * P
            },
            DataRun {
                offset: 63 * P,
                len: P,
                data_offset: 43 * P
            },
        ]
    );
    assert_eq!(m.regions[0].flags, vec!["private", "anonymous"]);
    assert_eq!(m.regions[1].runs, vec![]);
    assert_eq!(
        (m.regions[1].name.as_str(), m.regions[1].prot),
        ("[heap]", 1)
    );
    assert_eq!(m.regions[2].range(), STACK..STACK + 8 * P);
    assert_eq!(m.regions[2].data_bytes(), 3 * P);
    assert_eq!(m.regions[2].prot, 7);

    // Every written page reads back through its run, and the data file holds nothing else.
    let mut seen = 0;
    for r in &m.regions {
        for run in &r.runs {
            let got = img.data(run.data_offset, run.len).unwrap();
            assert_eq!(got, &pattern(r.start + run.offset, run.len, 0)[..]);
            seen += run.len;
        }
    }
    assert_eq!(seen, m.data_len);
    let all: Vec<u8> = s.written.iter().flat_map(|(_, b)| b.clone()).collect();
    assert_eq!(img.data(0, m.data_len).unwrap(), &all[..]);
    assert_eq!(img.verified_chunks(), (3, 3));
    img.verify_all().unwrap();
}

#[test]
fn data_verifies_only_the_chunks_a_request_touches_and_remembers_them() {
    let t = TempDir::new("lazy");
    write_sample(t.path());
    let img = Image::open(t.path()).unwrap();
    assert_eq!(img.verified_chunks(), (0, 3));
    img.data(CHUNK_SIZE + 5, 10).unwrap();
    assert_eq!(img.verified_chunks(), (1, 3));
    img.data(CHUNK_SIZE, CHUNK_SIZE).unwrap();
    assert_eq!(img.verified_chunks(), (1, 3));
    // A range crossing a chunk boundary checks both sides.
    img.data(CHUNK_SIZE - P, 2 * P).unwrap();
    assert_eq!(img.verified_chunks(), (2, 3));
    img.verify_all().unwrap();
    assert_eq!(img.verified_chunks(), (3, 3));
}

#[test]
fn data_refuses_out_of_range_requests_and_allows_empty_ones() {
    let t = TempDir::new("bounds");
    let s = write_sample(t.path());
    let img = Image::open(t.path()).unwrap();
    let n = s.manifest.data_len;
    assert_eq!(img.data(n, 0).unwrap(), &[] as &[u8]);
    assert_eq!(img.data(0, 0).unwrap(), &[] as &[u8]);
    assert_eq!(img.verified_chunks().0, 0);
    for (off, len) in [
        (n, 1),
        (n - 1, 2),
        (n + 1, 0),
        (0, n + 1),
        (u64::MAX, 1),
        (1, u64::MAX),
    ] {
        let e = img.data(off, len).unwrap_err();
        assert!(
            matches!(&e, ImageError::Invalid { path, .. } if path.ends_with(DATA_FILE)),
            "{off:#x}+{len:#x}: {e:?}"
        );
    }
    assert_eq!(img.data(n - 1, 1).unwrap().len(), 1);
}

#[test]
fn advice_on_any_range_is_harmless() {
    let t = TempDir::new("advise");
    let s = write_sample(t.path());
    let img = Image::open(t.path()).unwrap();
    for (off, len) in [
        (0, u64::MAX),
        (u64::MAX, u64::MAX),
        (5, 1),
        (CHUNK_SIZE, CHUNK_SIZE),
    ] {
        img.advise_willneed(off, len);
        img.advise_dontneed(off, len);
    }
    assert_eq!(
        img.data(0, 3 * P).unwrap(),
        &s.written[0].1[..],
        "contents survive MADV_DONTNEED"
    );
}

#[test]
fn image_without_data_round_trips() {
    let t = TempDir::new("nodata");
    let dir = t.sub("img");
    let mut w = ImageWriter::create(&dir, 1, "").unwrap();
    w.begin_region(0x1000, P, 0, &["reservation"], "").unwrap();
    let m = w.finish().unwrap();
    assert_eq!(m.data_len, 0);
    assert_eq!(fs::metadata(dir.join(DATA_FILE)).unwrap().len(), 0);
    assert_eq!(
        fs::read(dir.join(CHECKSUM_FILE)).unwrap(),
        b"UMMCSUM1\x00\x00\x01\x00\0\0\0\0\0\0\0\0"
    );
    let img = Image::open(&dir).unwrap();
    assert_eq!(img.manifest(), &m);
    assert_eq!(img.data(0, 0).unwrap(), &[] as &[u8]);
    assert_eq!(img.verified_chunks(), (0, 0));
    img.verify_all().unwrap();

    // And with no regions at all.
    let dir = t.sub("empty");
    let m = ImageWriter::create(&dir, 1, "").unwrap().finish().unwrap();
    assert_eq!(Image::open(&dir).unwrap().manifest(), &m);
}

#[test]
fn data_exactly_filling_chunks_has_no_short_last_chunk() {
    let t = TempDir::new("fullchunks");
    let dir = t.path();
    let mut w = ImageWriter::create(dir, 1, "x").unwrap();
    w.begin_region(0x100000, 2 * CHUNK_SIZE, 3, &[], "")
        .unwrap();
    w.write_pages(0x100000, &pattern(0x100000, 2 * CHUNK_SIZE, 9))
        .unwrap();
    w.finish().unwrap();
    assert_eq!(
        fs::metadata(dir.join(CHECKSUM_FILE)).unwrap().len(),
        20 + 2 * 4
    );
    let img = Image::open(dir).unwrap();
    img.verify_all().unwrap();
    assert_eq!(img.verified_chunks(), (2, 2));
}

#[test]
fn checksum_file_holds_crc32c_of_each_chunk() {
    let t = TempDir::new("crc");
    write_sample(t.path());
    let data = fs::read(t.path().join(DATA_FILE)).unwrap();
    let sums = fs::read(t.path().join(CHECKSUM_FILE)).unwrap();
    assert_eq!(&sums[..8], b"UMMCSUM1");
    assert_eq!(u32::from_le_bytes(sums[8..12].try_into().unwrap()), 65536);
    assert_eq!(u64::from_le_bytes(sums[12..20].try_into().unwrap()), 3);
    assert_eq!(sums.len(), 20 + 3 * 4);
    for (i, chunk) in data.chunks(CHUNK_SIZE as usize).enumerate() {
        let want = u32::from_le_bytes(sums[20 + 4 * i..24 + 4 * i].try_into().unwrap());
        assert_eq!(crc32c::crc32c(chunk), want, "chunk {i}");
    }
    // The CRC-32C check value from the standard (RFC 3720 / iSCSI).
    assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
}

#[test]
fn public_manifest_parse_reads_what_the_writer_wrote_and_to_json_writes_it_again() {
    let t = TempDir::new("public-parse");
    let s = write_sample(t.path());
    let text = fs::read(t.sub(MANIFEST_FILE)).unwrap();
    let m = Manifest::parse(Path::new("m.json"), &text).unwrap();
    assert_eq!(m, s.manifest);
    assert_eq!(m.to_json().as_bytes(), &text[..]);
    let e = Manifest::parse(Path::new("m.json"), b"{\"format\":\"umm-image\"}").unwrap_err();
    assert!(
        matches!(e, ImageError::Manifest { .. }),
        "a manifest without its fields: {e}"
    );
}

#[test]
fn manifest_is_the_documented_json() {
    let t = TempDir::new("json");
    write_sample(t.path());
    let v = read_json(t.path());
    assert_eq!(v["format"], "umm-image");
    assert_eq!(v["version"], 1);
    assert_eq!(v["page_size"], 4096);
    assert_eq!(v["chunk_size"], 65536);
    assert_eq!(v["data_len"], 47 * 4096);
    assert_eq!(
        v["source"],
        json!({"pid": 4242, "exe": "/usr/bin/sample", "created_unix": v["source"]["created_unix"]})
    );
    assert_eq!(
        v["regions"][0],
        json!({
            "start": "0x10000", "len": "0x40000", "prot": "rw-",
            "flags": ["private", "anonymous"], "name": "",
            "runs": [["0x0", "0x3000", "0x0"], ["0x5000", "0x28000", "0x3000"],
                     ["0x3f000", "0x1000", "0x2b000"]]
        })
    );
    assert_eq!(v["regions"][2]["prot"], "rwx");
    assert_eq!(v["regions"][2]["start"], "0x7ffff0000000");
    // One region per line, for line-oriented tools.
    let text = fs::read_to_string(t.path().join(MANIFEST_FILE)).unwrap();
    assert_eq!(text.lines().count(), 3 + 3 + 1);
}

#[test]
fn hex_strings_are_read_in_either_case_with_leading_zeros() {
    let t = TempDir::new("hexcase");
    let s = write_sample(t.path());
    edit_manifest(t.path(), |v| {
        v["regions"][2]["start"] = json!("0x00007FFFF0000000");
    });
    assert_eq!(Image::open(t.path()).unwrap().manifest(), &s.manifest);
}

#[test]
fn adjacent_runs_and_touching_regions_are_accepted() {
    let t = TempDir::new("adjacent");
    write_sample(t.path());
    // Split the 40-page run in two touching runs with touching data.
    edit_manifest(t.path(), |v| {
        let runs = v["regions"][0]["runs"].as_array_mut().unwrap();
        runs[1] = json!(["0x5000", "0x8000", "0x3000"]);
        runs.insert(2, json!(["0xd000", "0x20000", "0xb000"]));
    });
    let img = Image::open(t.path()).unwrap();
    assert_eq!(img.manifest().regions[0].runs.len(), 4);
    assert_eq!(
        img.manifest().regions[0].range().end,
        img.manifest().regions[1].start
    );
}

// ---- errors: files ------------------------------------------------------------------------

#[test]
fn missing_manifest_is_a_not_found_error_naming_it() {
    let t = TempDir::new("nomanifest");
    write_sample(t.path());
    fs::remove_file(t.path().join(MANIFEST_FILE)).unwrap();
    match Image::open(t.path()).unwrap_err() {
        ImageError::Io { path, err } => {
            assert_eq!(path, t.path().join(MANIFEST_FILE));
            assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        }
        e => panic!("{e:?}"),
    }
    let e = Image::open(&t.sub("no-such-dir")).unwrap_err();
    assert!(e.to_string().contains("manifest.json"), "{e}");
}

#[test]
fn unfinished_image_has_no_manifest_and_cannot_be_opened() {
    let t = TempDir::new("unfinished");
    let dir = t.sub("img");
    let mut w = ImageWriter::create(&dir, 1, "x").unwrap();
    w.begin_region(0x1000, 4 * P, 3, &[], "").unwrap();
    w.write_pages(0x1000, &pattern(0x1000, 2 * P, 0)).unwrap();
    drop(w);
    assert!(!dir.join(MANIFEST_FILE).exists());
    assert!(matches!(
        Image::open(&dir).unwrap_err(),
        ImageError::Io { err, .. } if err.kind() == std::io::ErrorKind::NotFound
    ));
}

/// The image rules forbid shrinking a served data file, but if it happens the check of a chunk
/// past the new end is an I/O error (`MADV_POPULATE_READ`), not a SIGBUS in the manager.
#[test]
fn a_data_file_shrunk_while_open_is_an_error_not_a_sigbus() {
    let t = TempDir::new("shrunk");
    let s = write_sample(t.path());
    let img = Image::open(t.path()).unwrap();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(t.path().join(DATA_FILE))
        .unwrap();
    f.set_len(CHUNK_SIZE).unwrap();
    // The first chunk is still in the file; the second is gone.
    assert!(img.data(0, P).is_ok());
    let e = img.data(CHUNK_SIZE + P, P).unwrap_err();
    assert!(
        matches!(e, ImageError::Io { .. }),
        "{e:?} (data_len {})",
        s.manifest.data_len
    );
    assert_eq!(
        img.verified_chunks().0,
        1,
        "the lost chunk is not counted as verified"
    );
}

#[test]
fn truncated_data_file_is_a_data_size_error() {
    let t = TempDir::new("truncated");
    let s = write_sample(t.path());
    let f = fs::OpenOptions::new()
        .write(true)
        .open(t.path().join(DATA_FILE))
        .unwrap();
    f.set_len(s.manifest.data_len - P).unwrap();
    match Image::open(t.path()).unwrap_err() {
        ImageError::DataSize {
            path,
            expected,
            found,
        } => {
            assert!(path.ends_with(DATA_FILE));
            assert_eq!((expected, found), (47 * P, 46 * P));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn extra_bytes_after_the_data_are_a_data_size_error() {
    let t = TempDir::new("extra");
    write_sample(t.path());
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(t.path().join(DATA_FILE))
        .unwrap();
    f.write_all(b"x").unwrap();
    assert!(matches!(
        Image::open(t.path()).unwrap_err(),
        ImageError::DataSize { expected, found, .. } if found == expected + 1
    ));
}

#[test]
fn missing_data_file_is_an_io_error_naming_it() {
    let t = TempDir::new("nodatafile");
    write_sample(t.path());
    fs::remove_file(t.path().join(DATA_FILE)).unwrap();
    assert!(matches!(
        Image::open(t.path()).unwrap_err(),
        ImageError::Io { path, .. } if path.ends_with(DATA_FILE)
    ));
}

/// A sample image with its checksum file replaced by `f(original)`: the error it gives.
fn open_with_checksums(f: impl FnOnce(Vec<u8>) -> Option<Vec<u8>>) -> ImageError {
    let t = TempDir::new("csum");
    write_sample(t.path());
    let p = t.path().join(CHECKSUM_FILE);
    match f(fs::read(&p).unwrap()) {
        Some(b) => fs::write(&p, b).unwrap(),
        None => fs::remove_file(&p).unwrap(),
    }
    Image::open(t.path()).unwrap_err()
}

#[track_caller]
fn assert_checksums_err(e: &ImageError, needle: &str) {
    assert!(
        matches!(e, ImageError::Checksums { path, .. } if path.ends_with(CHECKSUM_FILE)),
        "{e:?}"
    );
    assert!(detail(e).contains(needle), "{needle:?} not in {e}");
}

#[test]
fn checksum_file_of_the_wrong_length_is_refused() {
    let e = open_with_checksums(|mut b| {
        b.pop();
        Some(b)
    });
    assert_checksums_err(&e, "expected 32");
    let e = open_with_checksums(|mut b| {
        b.extend_from_slice(&[0; 4]);
        Some(b)
    });
    assert_checksums_err(&e, "36 bytes, expected 32");
    let e = open_with_checksums(|b| Some(b[..10].to_vec()));
    assert_checksums_err(&e, "too short");
    let e = open_with_checksums(|_| Some(Vec::new()));
    assert_checksums_err(&e, "too short");
}

#[test]
fn checksum_file_with_a_bad_header_is_refused() {
    let e = open_with_checksums(|mut b| {
        b[0] = b'X';
        Some(b)
    });
    assert_checksums_err(&e, "magic");
    let e = open_with_checksums(|mut b| {
        b[8..12].copy_from_slice(&4096u32.to_le_bytes());
        Some(b)
    });
    assert_checksums_err(&e, "chunk size 4096");
    // A count that disagrees with the data file, even with a length to match it.
    let e = open_with_checksums(|mut b| {
        b[12..20].copy_from_slice(&4u64.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        Some(b)
    });
    assert_checksums_err(&e, "4 checksums");
    let e = open_with_checksums(|mut b| {
        b[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        Some(b)
    });
    assert_checksums_err(&e, "checksums");
}

#[test]
fn missing_checksum_file_is_an_io_error_naming_it() {
    let e = open_with_checksums(|_| None);
    assert!(
        matches!(&e, ImageError::Io { path, .. } if path.ends_with(CHECKSUM_FILE)),
        "{e:?}"
    );
}

#[test]
fn oversized_manifest_is_refused_before_it_is_read() {
    let t = TempDir::new("huge");
    write_sample(t.path());
    // Sparse: costs no disk, and would cost a gigabyte of memory if it were read.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(t.path().join(MANIFEST_FILE))
        .unwrap();
    f.set_len(MAX_MANIFEST_BYTES + 1).unwrap();
    let e = Image::open(t.path()).unwrap_err();
    assert_manifest_err(&e, "limit");
}

#[test]
fn fifos_in_place_of_image_files_are_refused_without_blocking() {
    for (file, want_manifest_err) in [
        (MANIFEST_FILE, true),
        (DATA_FILE, false),
        (CHECKSUM_FILE, false),
    ] {
        let t = TempDir::new("fifo");
        write_sample(t.path());
        let p = t.path().join(file);
        fs::remove_file(&p).unwrap();
        nix::unistd::mkfifo(
            &p,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .unwrap();
        let e = Image::open(t.path()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{file}: {e}");
        assert_eq!(
            matches!(e, ImageError::Manifest { .. }),
            want_manifest_err,
            "{e:?}"
        );
    }
}

// ---- errors: manifest fields --------------------------------------------------------------

#[test]
fn manifest_that_is_not_json_is_a_manifest_error_with_its_position() {
    let t = TempDir::new("notjson");
    write_sample(t.path());
    fs::write(
        t.path().join(MANIFEST_FILE),
        "{\"format\": \"umm-image\",\n oops",
    )
    .unwrap();
    let e = Image::open(t.path()).unwrap_err();
    assert_manifest_err(&e, "line 2");
    fs::write(t.path().join(MANIFEST_FILE), "").unwrap();
    assert_manifest_err(&Image::open(t.path()).unwrap_err(), "EOF");
}

#[test]
fn wrong_version_is_a_version_error() {
    let e = open_edited(|v| v["version"] = json!(2));
    assert!(
        matches!(&e, ImageError::Version { found, .. } if found == "version 2"),
        "{e:?}"
    );
    // Even when the rest of a later version's manifest would not parse here.
    let e = open_edited(|v| {
        v["version"] = json!(3);
        v["new_field"] = json!(true);
    });
    assert!(matches!(&e, ImageError::Version { .. }), "{e:?}");
    let e = open_edited(|v| v["version"] = json!("1"));
    assert!(matches!(&e, ImageError::Version { .. }), "{e:?}");
    assert!(e.to_string().contains("version 1"), "{e}");
}

#[test]
fn wrong_format_name_is_a_version_error() {
    let e = open_edited(|v| v["format"] = json!("criu-pages"));
    assert!(
        matches!(&e, ImageError::Version { found, .. } if found.contains("criu-pages")),
        "{e:?}"
    );
}

#[test]
fn missing_field_is_a_manifest_error() {
    let e = open_edited(|v| {
        v.as_object_mut().unwrap().remove("data_len");
    });
    assert_manifest_err(&e, "missing field `data_len`");
    let e = open_edited(|v| {
        v["regions"][1].as_object_mut().unwrap().remove("runs");
    });
    assert_manifest_err(&e, "missing field `runs`");
    let e = open_edited(|v| {
        v.as_object_mut().unwrap().remove("version");
    });
    assert_manifest_err(&e, "missing field `version`");
}

#[test]
fn unknown_field_is_a_manifest_error() {
    let e = open_edited(|v| v["compression"] = json!("zstd"));
    assert_manifest_err(&e, "unknown field `compression`");
    let e = open_edited(|v| v["regions"][0]["shared"] = json!(false));
    assert_manifest_err(&e, "unknown field `shared`");
    let e = open_edited(|v| v["source"]["host"] = json!("x"));
    assert_manifest_err(&e, "unknown field `host`");
}

#[test]
fn duplicate_field_is_a_manifest_error() {
    let t = TempDir::new("dupfield");
    write_sample(t.path());
    let text = fs::read_to_string(t.path().join(MANIFEST_FILE)).unwrap();
    let text = text.replacen("\"data_len\":", "\"data_len\":0,\"data_len\":", 1);
    fs::write(t.path().join(MANIFEST_FILE), text).unwrap();
    assert_manifest_err(&Image::open(t.path()).unwrap_err(), "duplicate field");
}

#[test]
fn objects_spelled_as_arrays_are_refused() {
    let e = open_edited(|v| v["source"] = json!([1, "x", 2]));
    assert_manifest_err(&e, "JSON object");
    let e = open_edited(|v| {
        v["regions"][1] = json!(["0x50000", "0x10000", "r--", ["heap"], "[heap]", []])
    });
    assert_manifest_err(&e, "JSON object");
}

#[test]
fn unknown_flag_is_a_manifest_error() {
    let e = open_edited(|v| v["regions"][1]["flags"] = json!(["heap", "shared"]));
    assert_manifest_err(&e, "unknown flag \"shared\"");
    let e = open_edited(|v| v["regions"][1]["flags"] = json!(["heap", "heap"]));
    assert_manifest_err(&e, "twice");
    let e = open_edited(|v| v["regions"][1]["flags"] = json!([1]));
    assert_manifest_err(&e, "invalid type");
}

#[test]
fn bad_prot_is_a_manifest_error() {
    for bad in ["rw", "rwxp", "wr-", "RW-", ""] {
        let e = open_edited(|v| v["regions"][0]["prot"] = json!(bad));
        assert_manifest_err(&e, "protection");
    }
    let e = open_edited(|v| v["regions"][0]["prot"] = json!(3));
    assert_manifest_err(&e, "invalid type");
}

#[test]
fn bad_hex_is_a_manifest_error() {
    for bad in [
        json!("65536"),
        json!("0x"),
        json!("0x+1000"),
        json!("0x1_000"),
        json!(65536),
    ] {
        let e = open_edited(|v| v["regions"][0]["start"] = bad.clone());
        assert_manifest_err(&e, "hex string");
    }
    let e = open_edited(|v| v["regions"][0]["runs"][0][1] = json!("0x10000000000000000"));
    assert_manifest_err(&e, "hex string");
    let e = open_edited(|v| v["regions"][0]["runs"][0] = json!(["0x0", "0x3000"]));
    assert_manifest_err(&e, "invalid length");
}

#[test]
fn wrong_page_or_chunk_size_is_a_manifest_error() {
    assert_manifest_err(
        &open_edited(|v| v["page_size"] = json!(16384)),
        "page_size 16384",
    );
    assert_manifest_err(
        &open_edited(|v| v["chunk_size"] = json!(4096)),
        "chunk_size 4096",
    );
}

#[test]
fn numbers_out_of_range_are_manifest_errors() {
    assert_manifest_err(&open_edited(|v| v["data_len"] = json!(-1)), "invalid value");
    assert_manifest_err(
        &open_edited(|v| v["source"]["pid"] = json!(1u64 << 32)),
        "invalid value",
    );
    assert_manifest_err(&open_edited(|v| v["data_len"] = json!(1.5)), "invalid type");
}

// ---- errors: geometry ---------------------------------------------------------------------

#[test]
fn overlapping_regions_are_invalid() {
    let e = open_edited(|v| v["regions"][1]["start"] = hex(R1 - P));
    assert_invalid(&e, "must not overlap");
}

#[test]
fn unsorted_regions_are_invalid() {
    let e = open_edited(|v| v["regions"].as_array_mut().unwrap().swap(1, 2));
    assert_invalid(&e, "must be sorted");
}

#[test]
fn misaligned_region_start_is_invalid() {
    let e = open_edited(|v| v["regions"][1]["start"] = hex(R1 + 8));
    assert_invalid(&e, "not page aligned");
    let e = open_edited(|v| v["regions"][1]["len"] = hex(P + 1));
    assert_invalid(&e, "not page aligned");
}

#[test]
fn empty_region_or_run_is_invalid() {
    assert_invalid(&open_edited(|v| v["regions"][1]["len"] = hex(0)), "empty");
    let e = open_edited(|v| {
        v["regions"][0]["runs"]
            .as_array_mut()
            .unwrap()
            .insert(1, json!(["0x4000", "0x0", "0x3000"]));
    });
    assert_invalid(&e, "empty");
}

#[test]
fn region_above_the_address_limit_or_overflowing_is_invalid() {
    let e = open_edited(|v| v["regions"][2]["start"] = hex(MAX_ADDRESS - 4 * P));
    assert_invalid(&e, "ends above");
    let e = open_edited(|v| v["regions"][2]["start"] = hex(0xffff_ffff_ffff_f000));
    assert_invalid(&e, "ends above");
    let e = open_edited(|v| v["regions"][2]["len"] = hex(0xffff_ffff_ffff_f000));
    assert_invalid(&e, "ends above");
    // Ending exactly at the limit is fine (the data is not affected).
    let t = TempDir::new("atlimit");
    write_sample(t.path());
    edit_manifest(t.path(), |v| {
        v["regions"][2]["start"] = hex(MAX_ADDRESS - 8 * P)
    });
    Image::open(t.path()).unwrap();
}

#[test]
fn run_outside_its_region_is_invalid() {
    let e = open_edited(|v| v["regions"][0]["runs"][2][0] = hex(64 * P));
    assert_invalid(&e, "outside its region");
    let e = open_edited(|v| v["regions"][0]["runs"][2][1] = hex(2 * P));
    assert_invalid(&e, "outside its region");
    // Offsets so large that offset + len wraps around.
    let e = open_edited(|v| v["regions"][0]["runs"][2][0] = hex(0xffff_ffff_ffff_f000));
    assert_invalid(&e, "outside its region");
}

#[test]
fn overlapping_or_unsorted_runs_are_invalid() {
    let e = open_edited(|v| v["regions"][0]["runs"][1][0] = hex(2 * P));
    assert_invalid(&e, "must not overlap");
    // Data offsets still in order, addresses not.
    let e = open_edited(|v| v["regions"][0]["runs"][0][0] = hex(61 * P));
    assert_invalid(&e, "must be sorted");
}

#[test]
fn misaligned_run_is_invalid() {
    let e = open_edited(|v| v["regions"][0]["runs"][1][0] = hex(5 * P + 16));
    assert_invalid(&e, "not page aligned");
    let e = open_edited(|v| v["regions"][0]["runs"][0][2] = hex(8));
    assert_invalid(&e, "not page aligned");
}

#[test]
fn data_runs_with_a_gap_are_invalid() {
    let e = open_edited(|v| v["regions"][0]["runs"][1][2] = hex(4 * P));
    assert_invalid(&e, "without gaps or overlaps");
}

#[test]
fn data_runs_overlapping_in_the_data_file_are_invalid() {
    let e = open_edited(|v| v["regions"][0]["runs"][1][2] = hex(2 * P));
    assert_invalid(&e, "without gaps or overlaps");
    // Two runs sharing the same data.
    let e = open_edited(|v| v["regions"][2]["runs"][0][2] = hex(0));
    assert_invalid(&e, "without gaps or overlaps");
}

#[test]
fn first_run_not_at_the_start_of_the_data_is_invalid() {
    let e = open_edited(|v| v["regions"][0]["runs"][0][2] = hex(P));
    assert_invalid(&e, "expected 0x0");
}

#[test]
fn data_len_other_than_the_sum_of_the_runs_is_invalid() {
    let e = open_edited(|v| v["data_len"] = json!(48 * P));
    assert_invalid(&e, "data_len");
    let e = open_edited(|v| v["data_len"] = json!(u64::MAX));
    assert_invalid(&e, "data_len");
    // A run far past the end of the data file, with data_len to match: the file size check.
    let t = TempDir::new("bigdata");
    write_sample(t.path());
    edit_manifest(t.path(), |v| {
        v["regions"][2]["len"] = hex(1 << 40);
        v["regions"][2]["runs"][0][1] = hex(1 << 39);
        v["data_len"] = json!(44 * P + (1u64 << 39));
    });
    assert!(matches!(
        Image::open(t.path()).unwrap_err(),
        ImageError::DataSize { expected, found, .. } if expected == 44 * P + (1 << 39) && found == 47 * P
    ));
}

// ---- corruption ---------------------------------------------------------------------------

fn flip_byte(dir: &Path, offset: u64) {
    let p = dir.join(DATA_FILE);
    let mut b = fs::read(&p).unwrap();
    b[offset as usize] ^= 0x40;
    fs::write(&p, b).unwrap();
}

#[test]
fn flipped_byte_makes_only_its_chunk_corrupt_every_time() {
    let t = TempDir::new("flip");
    let s = write_sample(t.path());
    flip_byte(t.path(), CHUNK_SIZE + 1234);
    let img = Image::open(t.path()).unwrap();
    let n = s.manifest.data_len;

    // Neighbours read fine before and after.
    img.data(0, CHUNK_SIZE).unwrap();
    for _ in 0..3 {
        match img.data(CHUNK_SIZE + 8192, 4096).unwrap_err() {
            ImageError::Corrupt {
                path,
                chunk,
                expected,
                found,
            } => {
                assert!(path.ends_with(DATA_FILE));
                assert_eq!(chunk, 1);
                assert_ne!(expected, found);
            }
            e => panic!("{e:?}"),
        }
    }
    img.data(2 * CHUNK_SIZE, n - 2 * CHUNK_SIZE).unwrap();
    img.data(CHUNK_SIZE - 1, 1).unwrap();
    // Any range touching chunk 1 fails, from either side.
    assert!(matches!(
        img.data(CHUNK_SIZE - 1, 2),
        Err(ImageError::Corrupt { chunk: 1, .. })
    ));
    assert!(matches!(
        img.data(0, n),
        Err(ImageError::Corrupt { chunk: 1, .. })
    ));
    assert!(matches!(
        img.verify_all(),
        Err(ImageError::Corrupt { chunk: 1, .. })
    ));
    assert_eq!(img.verified_chunks(), (2, 3));
    let text = img.data(CHUNK_SIZE, 1).unwrap_err().to_string();
    assert!(
        text.contains("chunk 1") && text.contains("pages.img"),
        "{text}"
    );
}

#[test]
fn flipped_byte_in_the_short_last_chunk_is_caught() {
    let t = TempDir::new("fliplast");
    let s = write_sample(t.path());
    flip_byte(t.path(), s.manifest.data_len - 1);
    let img = Image::open(t.path()).unwrap();
    assert!(matches!(
        img.verify_all(),
        Err(ImageError::Corrupt { chunk: 2, .. })
    ));
    assert!(matches!(
        img.data(s.manifest.data_len - 1, 1),
        Err(ImageError::Corrupt { chunk: 2, .. })
    ));
    img.data(0, 2 * CHUNK_SIZE).unwrap();
}

#[test]
fn flipped_checksum_makes_its_chunk_corrupt() {
    let t = TempDir::new("flipsum");
    write_sample(t.path());
    let p = t.path().join(CHECKSUM_FILE);
    let mut b = fs::read(&p).unwrap();
    b[20] ^= 1;
    fs::write(&p, b).unwrap();
    let img = Image::open(t.path()).unwrap();
    assert!(matches!(
        img.data(0, 1),
        Err(ImageError::Corrupt { chunk: 0, .. })
    ));
    img.data(CHUNK_SIZE, 1).unwrap();
}

#[test]
fn verification_is_shared_between_threads() {
    let t = TempDir::new("threads");
    write_sample(t.path());
    flip_byte(t.path(), 10);
    let img = Image::open(t.path()).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for chunk in 0..3 {
                    let r = img.data(chunk * CHUNK_SIZE, 1);
                    assert_eq!(r.is_err(), chunk == 0);
                }
            });
        }
    });
    assert_eq!(img.verified_chunks(), (2, 3));
}

#[test]
fn image_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Image>();
}

// ---- writer input errors ------------------------------------------------------------------

#[track_caller]
fn assert_writer_invalid(r: Result<(), ImageError>, needle: &str) {
    match r {
        Err(ImageError::Invalid { detail, .. }) => {
            assert!(detail.contains(needle), "{needle:?} not in {detail:?}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn writer_refuses_a_non_empty_directory() {
    let t = TempDir::new("nonempty");
    fs::write(t.path().join("x"), "x").unwrap();
    match ImageWriter::create(t.path(), 1, "x") {
        Err(ImageError::Io { path, err }) => {
            assert_eq!(path, t.path());
            assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        }
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("created an image in a non-empty directory"),
    }
    // A finished image is a non-empty directory too.
    let dir = t.sub("img");
    write_sample(&dir);
    assert!(ImageWriter::create(&dir, 1, "x").is_err());
    // An empty existing directory, or a new nested one, is fine.
    let empty = t.sub("empty");
    fs::create_dir(&empty).unwrap();
    ImageWriter::create(&empty, 1, "x")
        .unwrap()
        .finish()
        .unwrap();
    ImageWriter::create(&t.sub("a/b/c"), 1, "x").unwrap();
    // A file is not a directory.
    assert!(ImageWriter::create(&t.path().join("x"), 1, "x").is_err());
}

#[test]
fn writer_refuses_regions_out_of_order_overlapping_or_misaligned() {
    let t = TempDir::new("wregions");
    let mut w = ImageWriter::create(t.path(), 1, "x").unwrap();
    w.begin_region(0x10000, 4 * P, 3, &[], "").unwrap();
    assert_writer_invalid(w.begin_region(0x11000, P, 3, &[], ""), "overlap");
    assert_writer_invalid(w.begin_region(0x1000, P, 3, &[], ""), "address order");
    assert_writer_invalid(w.begin_region(0x20001, P, 3, &[], ""), "not page aligned");
    assert_writer_invalid(
        w.begin_region(0x20000, P - 1, 3, &[], ""),
        "not page aligned",
    );
    assert_writer_invalid(w.begin_region(0x20000, 0, 3, &[], ""), "empty");
    assert_writer_invalid(w.begin_region(MAX_ADDRESS, P, 3, &[], ""), "ends above");
    assert_writer_invalid(
        w.begin_region(0x20000, u64::MAX - 0xfff, 3, &[], ""),
        "ends above",
    );
    assert_writer_invalid(w.begin_region(0x20000, P, 8, &[], ""), "prot");
    assert_writer_invalid(
        w.begin_region(0x20000, P, 3, &["shared"], ""),
        "unknown flag",
    );
    assert_writer_invalid(
        w.begin_region(0x20000, P, 3, &["heap", "heap"], ""),
        "twice",
    );
    // Refused input leaves the writer usable; a touching region is fine.
    w.begin_region(0x14000, P, 3, &[], "").unwrap();
    w.finish().unwrap();
    Image::open(t.path()).unwrap();
}

#[test]
fn writer_refuses_pages_out_of_order_outside_the_region_or_misaligned() {
    let t = TempDir::new("wpages");
    let page = pattern(0, P, 1);
    let mut w = ImageWriter::create(t.path(), 1, "x").unwrap();
    assert_writer_invalid(w.write_pages(0x10000, &page), "no region");
    w.begin_region(0x10000, 4 * P, 3, &[], "").unwrap();
    w.write_pages(0x12000, &page).unwrap();
    assert_writer_invalid(w.write_pages(0x12000, &page), "address order");
    assert_writer_invalid(w.write_pages(0x10000, &page), "address order");
    assert_writer_invalid(w.write_pages(0xf000, &page), "outside");
    assert_writer_invalid(w.write_pages(0x14000, &page), "outside");
    assert_writer_invalid(w.write_pages(0x13000, &pattern(0, 2 * P, 1)), "outside");
    assert_writer_invalid(w.write_pages(u64::MAX - 0xfff, &page), "outside");
    assert_writer_invalid(w.write_pages(0x13001, &page), "not page aligned");
    assert_writer_invalid(w.write_pages(0x13000, &page[..100]), "not page aligned");
    w.write_pages(0x13000, &[]).unwrap();
    w.write_pages(0x13000, &page).unwrap();
    // Pages of an earlier region cannot come after a later region began.
    w.begin_region(0x20000, P, 3, &[], "").unwrap();
    assert_writer_invalid(w.write_pages(0x13000, &page), "outside");
    let m = w.finish().unwrap();
    assert_eq!(
        m.regions[0].runs,
        vec![
            DataRun {
                offset: 2 * P,
                len: P,
                data_offset: 0
            },
            DataRun {
                offset: 3 * P,
                len: P,
                data_offset: P
            },
        ]
        .into_iter()
        .fold(Vec::<DataRun>::new(), |mut v, r| {
            // Adjacent writes join: one run of two pages.
            match v.last_mut() {
                Some(l) if l.offset + l.len == r.offset => l.len += r.len,
                _ => v.push(r),
            }
            v
        })
    );
    let img = Image::open(t.path()).unwrap();
    assert_eq!(
        img.data(0, 2 * P).unwrap(),
        &[page.clone(), page].concat()[..]
    );
}

#[test]
fn errors_name_their_file_and_detail() {
    let p = PathBuf::from("/img/pages.img");
    let e = ImageError::Corrupt {
        path: p.clone(),
        chunk: 2,
        expected: 0xdead_beef,
        found: 1,
    };
    assert_eq!(
        e.to_string(),
        "/img/pages.img: chunk 2 (bytes 0x20000..0x30000) is corrupt: CRC-32C 0x00000001, \
         expected 0xdeadbeef"
    );
    let e = ImageError::DataSize {
        path: p,
        expected: 8192,
        found: 4096,
    };
    assert!(
        e.to_string().contains("4096 bytes, the manifest says 8192"),
        "{e}"
    );
    let e = ImageError::Version {
        path: "/img/manifest.json".into(),
        found: "version 2".into(),
    };
    assert_eq!(
        e.to_string(),
        "/img/manifest.json: unsupported image (version 2); this build reads umm-image version 1"
    );
}

// ---- the man page -------------------------------------------------------------------------

/// The text of the first `.EX` … `.EE` block after `marker` in umm-image(5), roff escapes
/// for `-` and `"` undone, and the lines that the page wraps joined again.
fn man_example(marker: &str) -> String {
    let page = include_str!("../../man/umm-image.5");
    let from = page.find(marker).expect("marker in the man page");
    let start = from + page[from..].find(".EX\n").unwrap() + 4;
    let end = start + page[start..].find(".EE\n").unwrap();
    page[start..end].replace("\\-", "-").replace("\\(dq", "\"")
}

#[test]
fn man_page_example_manifest_is_valid() {
    let text = man_example(".SS Example");
    let m = manifest::parse(Path::new("umm-image.5"), text.as_bytes()).unwrap();
    assert_eq!(m.data_len, 90112);
    assert_eq!(m.regions.len(), 3);
    assert_eq!(checksums::chunk_count(m.data_len), 2);
}

#[test]
fn man_page_example_checksum_file_is_what_the_writer_writes_for_no_data() {
    let text = man_example("An image without data");
    let bytes: Vec<u8> = text
        .split_whitespace()
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    assert_eq!(bytes, checksums::encode(&[]));
}

#[test]
fn a_describe_only_writer_gives_the_manifest_and_checksums_a_real_one_writes() {
    let tmp = TempDir::new("describe");
    let dir = tmp.sub("img");
    let sample = write_sample(&dir);
    let image = Image::open(&dir).unwrap();
    let mut d = ImageWriter::describe_only(Path::new("<memory>"), 4242, "/usr/bin/sample");
    // Each region of the sample begun as the writer saw it, with the pages written in it.
    let mut pages = sample.written.iter().peekable();
    for r in &sample.manifest.regions {
        let flags: Vec<&str> = r.flags.iter().map(String::as_str).collect();
        d.begin_region(r.start, r.len, r.prot, &flags, &r.name)
            .unwrap();
        while let Some((addr, bytes)) = pages.next_if(|(a, _)| *a < r.start + r.len) {
            d.write_pages(*addr, bytes).unwrap();
        }
    }
    assert!(pages.next().is_none(), "pages outside every region");
    let (mut manifest, sums) = d.finish_description().unwrap();
    manifest.created_unix = sample.manifest.created_unix;
    assert_eq!(manifest, sample.manifest);
    assert_eq!(sums, image.checksums());
    let file = fs::read(dir.join(CHECKSUM_FILE)).unwrap();
    assert_eq!(
        parse_checksums(Path::new("x"), &file, manifest.data_len).unwrap(),
        sums
    );
    assert!(parse_checksums(Path::new("x"), &file[..file.len() - 1], manifest.data_len).is_err());
    // A describe-only writer has no files to finish.
    let d = ImageWriter::describe_only(Path::new("<memory>"), 1, "x");
    assert!(d.finish().is_err());
}
