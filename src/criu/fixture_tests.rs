//! Tests on real CRIU 4.2 images of memtest (`tests/fixtures/criu-4.2-memtest/`, README.md
//! there): the parent (pid 26975) fills a 16 MiB private anonymous area word by word with
//! `pat(i, 1)`, the child (26977) a 4 MiB one with `pat(i, 2)`; each also has a 4 MiB scratch
//! area holding `pat(i, seed + 100)` or zeros. Each area sits right below the previous mmap,
//! so the kernel merged scratch and main area into one VMA:
//! - parent: VMA 0x7f94f4200000-0x7f94f5600000 = scratch [0x7f94f4200000, +4 MiB) then the
//!   16 MiB area [0x7f94f4600000, 0x7f94f5600000);
//! - child: VMA 0x7f94f4e00000-0x7f94f5600000 = scratch [0x7f94f4e00000, +4 MiB) then the
//!   4 MiB area [0x7f94f5200000, 0x7f94f5600000).
//!
//! The metadata files are committed; the 29 MB `pages-*.img` are not. The metadata tests give
//! the reader sparse stand-ins of the sizes CRIU wrote; the full data check
//! (`criu_fixture_lazy_pages_match_memtest_pattern`, ignored by default, run by
//! `make criu-fixture-test`) reads the real pages files from `$UMM_CRIU_FIXTURE`, else
//! `/work/shared/fixtures/criu-4.2-memtest`, else `<repo>/../shared/fixtures/criu-4.2-memtest`.

use std::fs;
use std::path::{Path, PathBuf};

use super::encode::TempDir;
use super::*;
use crate::PAGE_SIZE;

const PARENT: u32 = 26975;
const CHILD: u32 = 26977;
const MIB: u64 = 1 << 20;

/// One memtest area: where it is, how big, the pattern seed, and whether pages may be zero
/// (the scratch areas, dropped with MADV_DONTNEED each pass).
struct Area {
    start: u64,
    len: u64,
    seed: u64,
    may_be_zero: bool,
}

fn areas(pid: u32) -> [Area; 2] {
    let (vma_start, main_len, seed) = match pid {
        PARENT => (0x7f94_f420_0000, 16 * MIB, 1),
        _ => (0x7f94_f4e0_0000, 4 * MIB, 2),
    };
    [
        Area {
            start: vma_start + 4 * MIB,
            len: main_len,
            seed,
            may_be_zero: false,
        },
        Area {
            start: vma_start,
            len: 4 * MIB,
            seed: seed + 100,
            may_be_zero: true,
        },
    ]
}

/// memtest.c's `pat()`: splitmix64 of the word index plus the seed.
fn pat(i: u64, seed: u64) -> u64 {
    let mut z = i.wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn committed_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/criu-4.2-memtest")
}

/// Sizes of the pages files CRIU wrote for the fixture.
const PAGES_SIZES: [(&str, u64); 2] = [("pages-1.img", 21_078_016), ("pages-2.img", 8_495_104)];

/// The committed metadata plus sparse pages files of the right sizes (contents all zero).
fn metadata_with_sparse_pages() -> TempDir {
    let t = TempDir::new("fixture");
    for entry in fs::read_dir(committed_fixture()).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, t.path().join(path.file_name().unwrap())).unwrap();
    }
    for (name, len) in PAGES_SIZES {
        fs::File::create(t.path().join(name))
            .unwrap()
            .set_len(len)
            .unwrap();
    }
    t
}

#[test]
fn fixture_inventory_and_tree() {
    let t = metadata_with_sparse_pages();
    let dir = ImageDir::open(t.path()).unwrap();
    let inv = dir.inventory();
    assert_eq!(inv.img_version, IMAGES_VERSION_V1_1);
    assert_eq!(inv.fdinfo_per_id, Some(true));
    assert_eq!(inv.root_ids.map(|r| r.vm_id), Some(1));
    assert_eq!(
        inv.dump_run_id.as_deref(),
        Some("3b8659ed-95ff-450a-a24b-33d814a1630c")
    );
    let tree = dir.pstree();
    assert_eq!(tree.entries.len(), 2);
    let root = tree.root();
    assert_eq!(
        (root.pid, root.ppid, root.pgid, root.sid),
        (PARENT, 0, PARENT, PARENT)
    );
    assert_eq!(root.threads, [PARENT]);
    let child = tree.get(CHILD).unwrap();
    assert_eq!(
        (child.ppid, child.pgid, child.sid),
        (PARENT, PARENT, PARENT)
    );
    assert_eq!(child.threads, [CHILD]);
}

#[test]
fn fixture_vmas() {
    let t = metadata_with_sparse_pages();
    let dir = ImageDir::open(t.path()).unwrap();
    for pid in [PARENT, CHILD] {
        let mm = dir.mm(pid).unwrap();
        assert_eq!(mm.vmas.len(), 23, "pid {pid}");
        assert!(mm.guards.is_empty());
        // The area VMA: private anonymous read-write, scratch + main area.
        let [main, scratch] = areas(pid);
        let v = &mm.vmas[mm.vma_at(main.start).unwrap()];
        assert_eq!(
            (v.start, v.end),
            (scratch.start, main.start + main.len),
            "pid {pid}"
        );
        assert!(v.is_anon_private());
        assert_eq!(v.prot, 3);
        assert_eq!(v.flags, 0x22, "MAP_PRIVATE | MAP_ANONYMOUS");
        // The last VMA is [vsyscall], above the 47-bit user range.
        assert_eq!(mm.vmas.last().unwrap().start, 0xffff_ffff_ff60_0000);
    }
}

#[test]
fn remote_lazy_runs_are_the_local_ones_keyed_by_address() {
    let t = metadata_with_sparse_pages();
    let dir = ImageDir::open(t.path()).unwrap();
    for pid in [PARENT, CHILD] {
        let local = dir.task_memory(pid).unwrap();
        let remote = dir.task_memory_remote(pid).unwrap();
        assert_eq!(local.lazy_runs.len(), remote.lazy_runs.len());
        for (l, r) in local.lazy_runs.iter().zip(&remote.lazy_runs) {
            assert_eq!((l.range(), l.vma), (r.range(), r.vma), "pid {pid}");
            // What a page server is asked with: the page's address in the dumped task.
            assert_eq!(r.pages_offset, r.start, "pid {pid}");
        }
    }
}

#[test]
fn fixture_lazy_runs_cover_the_memtest_areas() {
    let t = metadata_with_sparse_pages();
    let dir = ImageDir::open(t.path()).unwrap();
    for (pid, (pages_name, pages_len)) in [PARENT, CHILD].into_iter().zip(PAGES_SIZES) {
        let mem = dir.task_memory(pid).unwrap();
        assert_eq!(mem.pagemap.pages_file_name(), pages_name);
        assert_eq!(mem.pagemap.stored_bytes, pages_len);
        // Every page of both areas is lazy (20 entries of 256 pages merged into one run).
        let [main, scratch] = areas(pid);
        let run = mem
            .lazy_runs
            .iter()
            .find(|r| r.start <= main.start && main.start < r.end())
            .expect("a lazy run in the main area");
        assert_eq!(
            run.range(),
            scratch.start..main.start + main.len,
            "pid {pid}"
        );
        // Three pages are stored before it (the binary's data pages).
        assert_eq!(run.pages_offset, 3 * PAGE_SIZE);
        // Runs are sorted, disjoint, inside their VMA, and inside the pages file.
        let mm = &mem.mm;
        for w in mem.lazy_runs.windows(2) {
            assert!(w[0].end() <= w[1].start);
        }
        for r in &mem.lazy_runs {
            let v = &mm.vmas[r.vma];
            assert!(v.start <= r.start && r.end() <= v.end && v.is_anon_private());
            assert!(r.pages_offset + r.len <= pages_len);
        }
        let lazy_pages = mem.lazy_bytes() / PAGE_SIZE;
        let expected = match pid {
            PARENT => 5120 + 2 + 1 + 3 + 1 + 1 + 3,
            _ => 2048 + 2 + 1 + 3 + 1 + 1 + 3,
        };
        assert_eq!(lazy_pages, expected, "pid {pid}");
    }
}

/// Where the full fixture (with pages files) is, if anywhere.
fn full_fixture() -> Option<PathBuf> {
    let has_pages = |d: &Path| PAGES_SIZES.iter().all(|(name, _)| d.join(name).is_file());
    if let Some(dir) = std::env::var_os("UMM_CRIU_FIXTURE") {
        let dir = PathBuf::from(dir);
        assert!(
            has_pages(&dir),
            "UMM_CRIU_FIXTURE={} has no pages-1.img and pages-2.img",
            dir.display()
        );
        return Some(dir);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    [
        PathBuf::from("/work/shared/fixtures/criu-4.2-memtest"),
        repo.join("../shared/fixtures/criu-4.2-memtest"),
    ]
    .into_iter()
    .find(|d| has_pages(d))
}

/// Every lazy page of the 16 MiB and 4 MiB areas holds memtest's pattern, word for word, as
/// read through the mapped pages file at the offsets the reader computed (and the scratch
/// areas hold their pattern or zeros, page by page).
#[test]
#[ignore = "needs the CRIU fixture's pages-*.img (29 MB, not committed): make criu-fixture-test"]
fn criu_fixture_lazy_pages_match_memtest_pattern() {
    let dir = full_fixture().expect(
        "CRIU fixture pages not found: set UMM_CRIU_FIXTURE to a directory with the full \
         criu-4.2-memtest images",
    );
    let images = ImageDir::open(&dir).unwrap();
    for pid in [PARENT, CHILD] {
        let mem = images.task_memory(pid).unwrap();
        let pages = mem.open_pages().unwrap();
        for area in areas(pid) {
            let mut checked_pages = 0;
            let mut pattern_pages = 0;
            for run in &mem.lazy_runs {
                let start = run.start.max(area.start);
                let end = run.end().min(area.start + area.len);
                if start >= end {
                    continue;
                }
                let data = pages
                    .data(run.pages_offset + (start - run.start), end - start)
                    .unwrap();
                for (p, page) in data.chunks(PAGE_SIZE as usize).enumerate() {
                    let page_addr = start + p as u64 * PAGE_SIZE;
                    let first_word = (page_addr - area.start) / 8;
                    let words = page
                        .chunks(8)
                        .map(|w| u64::from_le_bytes(w.try_into().unwrap()));
                    let matches = words
                        .clone()
                        .enumerate()
                        .all(|(w, v)| v == pat(first_word + w as u64, area.seed));
                    let zero = area.may_be_zero && page.iter().all(|&b| b == 0);
                    assert!(
                        matches || zero,
                        "pid {pid}: page {page_addr:#x} (pages offset {:#x}) does not hold \
                         pat(i, {})",
                        run.pages_offset + (page_addr - run.start),
                        area.seed
                    );
                    checked_pages += 1;
                    pattern_pages += u64::from(matches);
                }
            }
            assert_eq!(
                checked_pages * PAGE_SIZE,
                area.len,
                "pid {pid}: lazy runs cover {checked_pages} pages of the area at {:#x}",
                area.start
            );
            if !area.may_be_zero {
                assert_eq!(pattern_pages * PAGE_SIZE, area.len);
            }
        }
    }
}

/// Every prefix and many one-byte corruptions of the real images give a result or a clear
/// error, never a panic; a cut inside an entry is always an error.
#[test]
fn fixture_images_cut_or_corrupted_never_panic() {
    use super::image::{ImageFile, ImageKind};
    let dir = committed_fixture();
    let read = |kind: ImageKind, bytes: Vec<u8>| -> Result<(), CriuError> {
        let file = ImageFile::parse(Path::new("x.img"), kind, bytes)?;
        match kind {
            ImageKind::Inventory => Inventory::from_image(&file).map(drop),
            ImageKind::Pstree => Pstree::from_image(&file).map(drop),
            ImageKind::Mm => Mm::from_image(&file).map(drop),
            ImageKind::Pagemap => Pagemap::from_image(&file).map(drop),
        }
    };
    for (name, kind) in [
        ("inventory.img", ImageKind::Inventory),
        ("pstree.img", ImageKind::Pstree),
        ("mm-26975.img", ImageKind::Mm),
        ("pagemap-26975.img", ImageKind::Pagemap),
    ] {
        let good = fs::read(dir.join(name)).unwrap();
        read(kind, good.clone()).unwrap();
        // Entry boundaries: where a cut leaves a well-framed (if incomplete) file.
        let mut boundaries = vec![];
        let mut pos = if kind == ImageKind::Inventory { 4 } else { 8 };
        while pos < good.len() {
            boundaries.push(pos);
            pos += 4 + u32::from_le_bytes(good[pos..pos + 4].try_into().unwrap()) as usize;
        }
        for cut in 0..good.len() {
            let result = read(kind, good[..cut].to_vec());
            if !boundaries.contains(&cut) {
                assert!(result.is_err(), "{name} cut at {cut} was accepted");
            }
        }
        for at in 0..good.len() {
            for byte in [0x00, 0xff, 0x80, good[at] ^ 1] {
                let mut bad = good.clone();
                bad[at] = byte;
                let _ = read(kind, bad);
            }
        }
    }
}
