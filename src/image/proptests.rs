//! Property tests: `Image::open` never panics on mutated manifests and checksum files (and an
//! image it accepts serves every run without panicking); random writer inputs round-trip.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{json, Value};

use super::tests::{pattern, TempDir};
use super::*;
use crate::PAGE_SIZE;

const P: u64 = PAGE_SIZE;

/// A small valid image (two regions, holes, three chunks), written once per test process.
struct Base {
    _dir: TempDir,
    manifest: Vec<u8>,
    checksums: Vec<u8>,
    data: Vec<u8>,
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = TempDir::new("prop-base");
        let mut w = ImageWriter::create(dir.path(), 7, "/bin/base").unwrap();
        w.begin_region(0x40_0000, 64 * P, 3, &["private", "anonymous"], "")
            .unwrap();
        w.write_pages(0x40_0000, &pattern(0x40_0000, 20 * P, 3))
            .unwrap();
        w.write_pages(0x40_0000 + 30 * P, &pattern(0x40_0000 + 30 * P, 20 * P, 3))
            .unwrap();
        w.begin_region(0x7f00_0000_0000, 16 * P, 1, &["stack"], "[stack]")
            .unwrap();
        w.write_pages(0x7f00_0000_0000 + 15 * P, &pattern(0, P, 3))
            .unwrap();
        w.finish().unwrap();
        let read = |f| fs::read(dir.path().join(f)).unwrap();
        Base {
            manifest: read(MANIFEST_FILE),
            checksums: read(CHECKSUM_FILE),
            data: read(DATA_FILE),
            _dir: dir,
        }
    })
}

/// Byte-level damage to a file's contents.
#[derive(Clone, Debug)]
enum ByteEdit {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, m)| ByteEdit::Flip(i, m)),
        (
            any::<usize>(),
            prop::sample::select(b"{}[]\",:0x19afAF-+ e".to_vec())
        )
            .prop_map(|(i, b)| ByteEdit::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        any::<usize>().prop_map(ByteEdit::Delete),
        any::<usize>().prop_map(ByteEdit::Truncate),
    ]
}

fn apply_bytes(mut b: Vec<u8>, edits: &[ByteEdit]) -> Vec<u8> {
    for e in edits {
        let n = b.len();
        match *e {
            ByteEdit::Flip(i, m) if n > 0 => b[i % n] ^= m,
            ByteEdit::Set(i, v) if n > 0 => b[i % n] = v,
            ByteEdit::Insert(i, v) => b.insert(i % (n + 1), v),
            ByteEdit::Delete(i) if n > 0 => {
                b.remove(i % n);
            }
            ByteEdit::Truncate(i) => b.truncate(i % (n + 1)),
            _ => {}
        }
    }
    b
}

/// A value likely to hit an edge of some rule.
fn edge_value() -> impl Strategy<Value = Value> {
    let num = prop_oneof![
        Just(0u64),
        Just(P),
        Just(CHUNK_SIZE),
        Just(MAX_ADDRESS),
        Just(MAX_ADDRESS - P),
        Just(u64::MAX),
        Just(u64::MAX - P + 1),
        Just(1u64 << 63),
        0..(1u64 << 20),
        any::<u64>(),
    ];
    prop_oneof![
        4 => num.clone().prop_map(|v| json!(format!("{v:#x}"))),
        2 => num.prop_map(|v| json!(v)),
        1 => Just(json!(-1)),
        1 => Just(json!(null)),
        1 => Just(json!("rw-")),
        1 => Just(json!("0x")),
        1 => Just(json!([])),
        1 => Just(json!({})),
        1 => Just(json!(["heap"])),
        1 => Just(json!(["0x0", "0x1000", "0x0"])),
    ]
}

/// Structured damage: replace, remove or add one value somewhere in the manifest.
#[derive(Clone, Debug)]
enum JsonEdit {
    Replace(usize, Value),
    Remove(usize),
    AddKey(usize, Value),
    Duplicate(usize),
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        4 => (any::<usize>(), edge_value()).prop_map(|(i, v)| JsonEdit::Replace(i, v)),
        1 => any::<usize>().prop_map(JsonEdit::Remove),
        1 => (any::<usize>(), edge_value()).prop_map(|(i, v)| JsonEdit::AddKey(i, v)),
        1 => any::<usize>().prop_map(JsonEdit::Duplicate),
    ]
}

/// JSON pointers of every value below the root, in document order.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{at}/{k}");
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                pointers(x, p, out);
            }
        }
        _ => {}
    }
}

fn apply_json(v: &mut Value, edits: &[JsonEdit]) {
    for e in edits {
        let mut ps = Vec::new();
        pointers(v, String::new(), &mut ps);
        if ps.is_empty() {
            return;
        }
        let pick = |i: usize| ps[i % ps.len()].clone();
        let parent_of = |p: &str| p[..p.rfind('/').unwrap_or(0)].to_string();
        let last_of = |p: &str| p[p.rfind('/').map_or(0, |i| i + 1)..].to_string();
        match e {
            JsonEdit::Replace(i, x) => {
                if let Some(slot) = v.pointer_mut(&pick(*i)) {
                    *slot = x.clone();
                }
            }
            JsonEdit::Remove(i) => {
                let p = pick(*i);
                let key = last_of(&p);
                match v.pointer_mut(&parent_of(&p)) {
                    Some(Value::Object(m)) => {
                        m.remove(&key);
                    }
                    Some(Value::Array(a)) => {
                        if let Ok(k) = key.parse::<usize>() {
                            if k < a.len() {
                                a.remove(k);
                            }
                        }
                    }
                    _ => {}
                }
            }
            JsonEdit::AddKey(i, x) => match v.pointer_mut(&parent_of(&pick(*i))) {
                Some(Value::Object(m)) => {
                    m.insert("extra".into(), x.clone());
                }
                Some(Value::Array(a)) => a.push(x.clone()),
                _ => {}
            },
            JsonEdit::Duplicate(i) => {
                let p = pick(*i);
                let key = last_of(&p);
                if let Some(Value::Array(a)) = v.pointer_mut(&parent_of(&p)) {
                    if let Ok(k) = key.parse::<usize>() {
                        if k < a.len() {
                            let x = a[k].clone();
                            a.insert(k, x);
                        }
                    }
                }
            }
        }
    }
}

/// Write the base image with these manifest and checksum bytes into `dir` and open it. An
/// image that opens must serve every run (verified or `Corrupt`, never out of range) and
/// never panic.
fn open_and_use(dir: &Path, manifest: &[u8], checksums: &[u8]) {
    fs::write(dir.join(MANIFEST_FILE), manifest).unwrap();
    fs::write(dir.join(CHECKSUM_FILE), checksums).unwrap();
    if let Ok(img) = Image::open(dir) {
        let m = img.manifest();
        for r in &m.regions {
            assert!(r.range().end <= MAX_ADDRESS);
            for run in &r.runs {
                assert!(run.offset + run.len <= r.len);
                match img.data(run.data_offset, run.len) {
                    Ok(b) => assert_eq!(b.len() as u64, run.len),
                    Err(ImageError::Corrupt { .. }) => {}
                    Err(e) => panic!("an accepted run is not servable: {e}"),
                }
            }
        }
        let _ = img.verify_all();
        let _ = img.data(0, m.data_len);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Keep any saved failure next to this file (src/image/proptests.regressions).
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn open_never_panics_on_damaged_manifest_bytes(
        edits in prop::collection::vec(byte_edit(), 1..6),
    ) {
        let b = base();
        let t = TempDir::new("prop-bytes");
        fs::write(t.path().join(DATA_FILE), &b.data).unwrap();
        open_and_use(t.path(), &apply_bytes(b.manifest.clone(), &edits), &b.checksums);
    }

    #[test]
    fn open_never_panics_on_damaged_manifest_values(
        edits in prop::collection::vec(json_edit(), 1..4),
    ) {
        let b = base();
        let t = TempDir::new("prop-json");
        fs::write(t.path().join(DATA_FILE), &b.data).unwrap();
        let mut v: Value = serde_json::from_slice(&b.manifest).unwrap();
        apply_json(&mut v, &edits);
        open_and_use(t.path(), &serde_json::to_vec(&v).unwrap(), &b.checksums);
    }

    #[test]
    fn open_never_panics_on_damaged_checksum_files(
        edits in prop::collection::vec(byte_edit(), 1..6),
    ) {
        let b = base();
        let t = TempDir::new("prop-csum");
        fs::write(t.path().join(DATA_FILE), &b.data).unwrap();
        open_and_use(t.path(), &b.manifest, &apply_bytes(b.checksums.clone(), &edits));
    }
}

/// One region to write: its gap after the previous region, its length, and the stretches of
/// pages written into it as (hole before, pages) in page units.
type RegionSpec = (u64, u64, Vec<(u64, u64)>);

fn region_spec() -> impl Strategy<Value = RegionSpec> {
    (
        0..4u64,
        1..48u64,
        prop::collection::vec((0..3u64, 1..24u64), 0..5),
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_writer_inputs_round_trip(
        base_page in 1..(1u64 << 20),
        regions in prop::collection::vec(region_spec(), 0..5),
        seed in any::<u8>(),
    ) {
        let t = TempDir::new("prop-rt");
        let dir = t.sub("img");
        let mut w = ImageWriter::create(&dir, 9, "/bin/rt").unwrap();
        let mut addr = base_page * P;
        // Every page written, by address, and the expected regions.
        let mut pages = BTreeSet::new();
        let mut bounds = Vec::new();
        for (gap, len, writes) in &regions {
            let start = addr + gap * P;
            let end = start + len * P;
            w.begin_region(start, len * P, 3, &["private", "anonymous"], "").unwrap();
            let mut at = start;
            for (hole, n) in writes {
                let s = at + hole * P;
                let e = (s + n * P).min(end);
                if s >= e {
                    break;
                }
                w.write_pages(s, &pattern(s, e - s, seed)).unwrap();
                pages.extend((s..e).step_by(P as usize));
                at = e;
            }
            bounds.push((start, end));
            addr = end;
        }
        let written = w.finish().unwrap();
        let img = Image::open(&dir).unwrap();
        prop_assert_eq!(img.manifest(), &written);
        prop_assert_eq!(img.manifest().data_len, pages.len() as u64 * P);
        prop_assert_eq!(img.manifest().regions.len(), bounds.len());

        let mut covered = BTreeSet::new();
        for (r, &(s, e)) in img.manifest().regions.iter().zip(&bounds) {
            prop_assert_eq!(r.range(), s..e);
            for (k, run) in r.runs.iter().enumerate() {
                // Runs are maximal: the writer joined every adjacent write.
                if k > 0 {
                    let prev = r.runs[k - 1];
                    prop_assert!(prev.offset + prev.len < run.offset);
                }
                let a = r.start + run.offset;
                prop_assert_eq!(img.data(run.data_offset, run.len).unwrap(), &pattern(a, run.len, seed)[..]);
                covered.extend((a..a + run.len).step_by(P as usize));
            }
        }
        prop_assert_eq!(covered, pages);
        img.verify_all().unwrap();
        let (done, all) = img.verified_chunks();
        prop_assert_eq!(done, all);
        prop_assert_eq!(all, img.manifest().data_len.div_ceil(CHUNK_SIZE));
    }
}
