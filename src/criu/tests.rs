//! Unit tests: the wire decoder, the framing, every typed reader and every validation rule,
//! on small images built in memory by [`super::encode`].

use std::path::Path;

use super::encode::*;
use super::image::{ImageFile, ImageKind};
use super::wire::{fields, read_varint, Value};
use super::*;
use crate::PAGE_SIZE;

const P: u64 = PAGE_SIZE;

// ---- wire decoder ----

#[test]
fn varints_round_trip_up_to_u64_max() {
    for v in [0, 1, 127, 128, 300, u32::MAX as u64, 1 << 63, u64::MAX] {
        let enc = varint(v);
        let mut pos = 0;
        assert_eq!(read_varint(&enc, &mut pos), Ok(v));
        assert_eq!(pos, enc.len());
    }
    assert_eq!(varint(u64::MAX).len(), 10);
}

#[test]
fn varint_overflowing_64_bits_is_refused() {
    // Ten bytes whose last carries more than bit 63.
    let mut enc = vec![0xff; 9];
    enc.push(0x02);
    let err = read_varint(&enc, &mut 0).unwrap_err();
    assert!(err.detail.contains("overflows 64 bits"), "{err}");
    // Eleven bytes (the tenth still has its continuation bit).
    let err = read_varint(&[0xff; 11], &mut 0).unwrap_err();
    assert!(err.detail.contains("overflows 64 bits"), "{err}");
}

#[test]
fn truncated_varint_is_refused() {
    let err = read_varint(&[0x80, 0x80], &mut 0).unwrap_err();
    assert!(err.detail.contains("truncated varint"), "{err}");
    let err = read_varint(&[], &mut 0).unwrap_err();
    assert!(err.detail.contains("truncated varint"), "{err}");
}

#[test]
fn every_wire_type_decodes() {
    let m = Msg::new()
        .varint(1, 300)
        .fixed64(2, 0x0102_0304_0506_0708)
        .bytes(3, b"abc")
        .fixed32(4, 0xdead_beef);
    let got: Vec<_> = fields(&m.0).map(|f| f.unwrap()).collect();
    assert_eq!(got.len(), 4);
    assert_eq!((got[0].number, got[0].value), (1, Value::Varint(300)));
    assert_eq!(got[1].value, Value::Fixed64(0x0102_0304_0506_0708));
    assert_eq!(got[2].value, Value::Bytes(b"abc"));
    assert_eq!(got[3].value, Value::Fixed32(0xdead_beef));
    assert_eq!(got[3].offset, m.0.len() - 5);
}

fn first_error(buf: &[u8]) -> String {
    fields(buf)
        .find_map(|f| f.err())
        .expect("an error")
        .to_string()
}

#[test]
fn malformed_fields_are_refused() {
    // Length-delimited value longer than what is left.
    let msg = Msg::new().varint(1, 5).raw(&[0x12, 10, b'a']);
    assert!(first_error(&msg.0).contains("length 10 runs past the end"));
    // Truncated fixed-width values.
    assert!(first_error(&[0x09, 1, 2, 3]).contains("truncated 64-bit"));
    assert!(first_error(&[0x0d, 1, 2]).contains("truncated 32-bit"));
    // Groups and invalid wire types.
    assert!(first_error(&[0x0b]).contains("groups"));
    assert!(first_error(&[0x0c]).contains("groups"));
    assert!(first_error(&[0x0e, 0]).contains("invalid wire type 6"));
    assert!(first_error(&[0x0f, 0]).contains("invalid wire type 7"));
    // Field number 0.
    assert!(first_error(&[0x00, 0]).contains("invalid field number 0"));
    // Key truncated mid-varint.
    assert!(first_error(&[0x80]).contains("truncated varint"));
}

#[test]
fn iteration_stops_after_the_first_error() {
    let mut it = fields(&[0x0f, 0x08, 0x01]);
    assert!(it.next().unwrap().is_err());
    assert!(it.next().is_none());
}

fn one_field(m: &Msg) -> wire::Field<'_> {
    fields(&m.0).next().unwrap().unwrap()
}

#[test]
fn typed_views_check_wire_type_and_range() {
    let big = Msg::new().varint(7, 1 << 32);
    let err = one_field(&big).u32("nr").unwrap_err().to_string();
    assert!(
        err.contains("field nr (7)") && err.contains("does not fit a uint32"),
        "{err}"
    );
    let two = Msg::new().varint(3, 2);
    let err = one_field(&two).bool("flag").unwrap_err().to_string();
    assert!(err.contains("not a bool"), "{err}");
    let bytes = Msg::new().bytes(1, b"x");
    let err = one_field(&bytes).u64("vaddr").unwrap_err().to_string();
    assert!(
        err.contains("field vaddr (1)") && err.contains("expected varint"),
        "{err}"
    );
    let bad_utf8 = Msg::new().bytes(13, &[0xff, 0xfe]);
    let err = one_field(&bad_utf8).string("id").unwrap_err().to_string();
    assert!(err.contains("UTF-8"), "{err}");
    for v in [0i64, 1, -1, i64::MIN, i64::MAX] {
        let m = Msg::new().sint64(8, v);
        assert_eq!(one_field(&m).sint64("fd"), Ok(v));
    }
    let neg = Msg::new().varint(15, (-5i64) as u64);
    assert_eq!(one_field(&neg).i32("dumpable"), Ok(-5));
    let too_neg = Msg::new().varint(15, (i64::from(i32::MIN) - 1) as u64);
    assert!(one_field(&too_neg).i32("dumpable").is_err());
}

#[test]
fn unknown_fields_of_every_wire_type_are_skipped() {
    let m = Msg::new()
        .fixed32(99, 1)
        .varint(1, 42)
        .fixed64(100, 2)
        .varint(2, 1)
        .bytes(101, b"future")
        .varint(3, 42)
        .varint(4, 42)
        .varint(5, 42)
        .varint(1000, 7);
    let e = PstreeEntry::decode(&m.0).unwrap();
    assert_eq!((e.pid, e.ppid, e.pgid, e.sid), (42, 1, 42, 42));
    assert_eq!(e.threads, vec![42]);
}

#[test]
fn repeated_u32_reads_unpacked_and_packed() {
    let unpacked = pstree_entry(10, 0).varint(5, 11).varint(5, 12);
    assert_eq!(
        PstreeEntry::decode(&unpacked.0).unwrap().threads,
        [10, 11, 12]
    );
    let mut packed_bytes = varint(10);
    packed_bytes.extend(varint(300));
    let packed = Msg::new()
        .varint(1, 10)
        .varint(2, 0)
        .varint(3, 10)
        .varint(4, 10)
        .bytes(5, &packed_bytes);
    assert_eq!(PstreeEntry::decode(&packed.0).unwrap().threads, [10, 300]);
    let truncated = Msg::new().varint(1, 10).bytes(5, &[0x80]);
    let err = PstreeEntry::decode(&truncated.0).unwrap_err().to_string();
    assert!(
        err.contains("field threads (5)") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn missing_required_field_is_named() {
    let m = Msg::new().varint(1, 10).varint(2, 0).varint(4, 10);
    let err = PstreeEntry::decode(&m.0).unwrap_err().to_string();
    assert_eq!(err, "field pgid (3): required field is missing");
}

#[test]
fn error_inside_an_embedded_message_names_the_path() {
    let bad_vma = Msg::new().varint(1, P).bytes(2, b"x");
    let m = mm_entry(&[anon_vma(P, 2 * P), bad_vma]);
    let err = Mm::decode_vmas(&m.0).unwrap_err().to_string();
    assert!(err.starts_with("vmas[1] (14): field end (2)"), "{err}");
}

// ---- framing ----

fn parse(kind: ImageKind, bytes: Vec<u8>) -> Result<ImageFile, CriuError> {
    ImageFile::parse(Path::new("/img/x.img"), kind, bytes)
}

fn format_error(kind: ImageKind, bytes: Vec<u8>) -> String {
    match parse(kind, bytes) {
        Err(e @ CriuError::Format { .. }) => e.to_string(),
        other => panic!("expected a Format error, got {other:?}"),
    }
}

#[test]
fn framing_splits_entries() {
    let f = parse(
        ImageKind::Pstree,
        common_file(
            PSTREE_MAGIC,
            &[pstree_entry(1, 0), Msg::new(), pstree_entry(2, 1)],
        ),
    )
    .unwrap();
    assert_eq!(f.len(), 3);
    assert_eq!(f.entry(0), &pstree_entry(1, 0).0[..]);
    assert!(f.entry(1).is_empty());
}

#[test]
fn bad_magic_is_refused() {
    let err = format_error(ImageKind::Pstree, image(&[0x1234_5678, PSTREE_MAGIC], &[]));
    assert!(err.contains("bad magic 0x12345678"), "{err}");
    let err = format_error(ImageKind::Inventory, image(&[PSTREE_MAGIC], &[]));
    assert!(
        err.contains("wrong image type") && err.contains("(pstree)"),
        "{err}"
    );
}

#[test]
fn wrong_image_type_is_refused() {
    let err = format_error(ImageKind::Pstree, common_file(PAGEMAP_MAGIC, &[]));
    assert!(
        err.contains("wrong image type: magic 0x56084025 (pagemap), expected 0x50273030 (pstree)"),
        "{err}"
    );
}

#[test]
fn service_file_and_v1_image_are_refused() {
    let err = format_error(ImageKind::Mm, service_file(MM_MAGIC, &[]));
    assert!(err.contains("service file magic"), "{err}");
    let err = format_error(ImageKind::Mm, image(&[MM_MAGIC], &[]));
    assert!(err.contains("without the common magic"), "{err}");
}

#[test]
fn too_short_for_magic_is_refused() {
    let err = format_error(ImageKind::Pstree, vec![0x19, 0x43]);
    assert!(err.contains("too short for the magic"), "{err}");
    let err = format_error(ImageKind::Pstree, IMG_COMMON_MAGIC.to_le_bytes().to_vec());
    assert!(err.contains("too short for the magic"), "{err}");
}

#[test]
fn truncated_entry_length_is_refused() {
    let mut bytes = common_file(PSTREE_MAGIC, &[pstree_entry(1, 0)]);
    bytes.extend([5, 0]);
    let err = format_error(ImageKind::Pstree, bytes);
    assert!(
        err.contains("entry 1") && err.contains("truncated length"),
        "{err}"
    );
}

#[test]
fn entry_length_past_the_end_is_refused() {
    let mut bytes = common_file(PSTREE_MAGIC, &[pstree_entry(1, 0)]);
    let cut = bytes.len() - 1;
    bytes.truncate(cut);
    let err = format_error(ImageKind::Pstree, bytes);
    assert!(
        err.contains("entry 0") && err.contains("runs past the end of the file"),
        "{err}"
    );
    let mut huge = common_file(PSTREE_MAGIC, &[]);
    huge.extend(u32::MAX.to_le_bytes());
    let err = format_error(ImageKind::Pstree, huge);
    assert!(err.contains("length 4294967295 runs past"), "{err}");
}

#[test]
fn decode_error_names_file_entry_message_and_field() {
    let t = TempDir::new("names");
    let p = t.write(
        "pstree.img",
        &common_file(
            PSTREE_MAGIC,
            &[pstree_entry(1, 0), Msg::new().varint(1, 1 << 40)],
        ),
    );
    let err = Pstree::read(&p).unwrap_err();
    assert!(matches!(err, CriuError::Decode { entry: 1, .. }), "{err:?}");
    let s = err.to_string();
    assert!(
        s.contains("pstree.img: entry 1 (pstree_entry): field pid (1)") && s.contains("uint32"),
        "{s}"
    );
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let err = Pstree::read(Path::new("/nonexistent/umm/pstree.img")).unwrap_err();
    assert!(
        matches!(&err, CriuError::Io { err, .. } if err.kind() == std::io::ErrorKind::NotFound)
    );
    assert!(err.to_string().starts_with("/nonexistent/umm/pstree.img: "));
}

// ---- inventory ----

fn inventory_of(bytes: Vec<u8>) -> Result<Inventory, CriuError> {
    Inventory::from_image(&parse(ImageKind::Inventory, bytes)?)
}

#[test]
fn inventory_reads_version_ids_and_run_id() {
    let inv = inventory_of(inventory_file(&inventory(2).varint(8, 12345))).unwrap();
    assert_eq!(inv.img_version, 2);
    assert_eq!(inv.fdinfo_per_id, Some(true));
    assert_eq!(inv.root_ids.map(|r| r.vm_id), Some(1));
    assert_eq!(inv.dump_uptime, Some(12345));
    assert_eq!(
        inv.dump_run_id.as_deref(),
        Some("00000000-0000-0000-0000-000000000000")
    );
}

#[test]
fn inventory_of_another_version_is_refused() {
    let err = inventory_of(inventory_file(&inventory(1))).unwrap_err();
    assert!(matches!(err, CriuError::Invalid { .. }));
    assert!(err.to_string().contains("image version 1"), "{err}");
}

#[test]
fn inventory_needs_exactly_one_entry() {
    let two = image(&[INVENTORY_MAGIC], &[inventory(2), inventory(2)]);
    assert!(inventory_of(two)
        .unwrap_err()
        .to_string()
        .contains("2 entries"));
    let none = image(&[INVENTORY_MAGIC], &[]);
    assert!(inventory_of(none)
        .unwrap_err()
        .to_string()
        .contains("0 entries"));
    let no_version = inventory_file(&Msg::new().varint(2, 1));
    let err = inventory_of(no_version).unwrap_err().to_string();
    assert!(
        err.contains("img_version (1): required field is missing"),
        "{err}"
    );
}

// ---- pstree ----

fn pstree_of(entries: &[Msg]) -> Result<Pstree, CriuError> {
    Pstree::from_image(&parse(
        ImageKind::Pstree,
        common_file(PSTREE_MAGIC, entries),
    )?)
}

#[test]
fn pstree_reads_a_tree() {
    let t = pstree_of(&[
        pstree_entry(10, 0),
        pstree_entry(11, 10),
        pstree_entry(12, 11).varint(5, 13),
    ])
    .unwrap();
    assert_eq!(t.root().pid, 10);
    assert_eq!(t.pids().collect::<Vec<_>>(), [10, 11, 12]);
    assert_eq!(t.get(12).unwrap().threads, [12, 13]);
    assert!(t.get(13).is_none());
}

#[test]
fn pstree_accepts_a_zombie_whose_thread_id_is_0() {
    // What CRIU 4.2 wrote for a grandchild of memtest that had exited but was not reaped.
    let zombie = |threads: &[u64]| {
        let mut m = Msg::new()
            .varint(1, 11)
            .varint(2, 10)
            .varint(3, 10)
            .varint(4, 10);
        for &t in threads {
            m = m.varint(5, t);
        }
        m
    };
    let t = pstree_of(&[pstree_entry(10, 0), zombie(&[0])]).unwrap();
    assert_eq!(t.get(11).unwrap().threads, [0]);
    // Only the single 0 of a zombie: 0 among real thread ids stays an error.
    for bad in [&[0, 0][..], &[11, 0]] {
        let e = pstree_of(&[pstree_entry(10, 0), zombie(bad)]);
        assert!(e.is_err(), "{bad:?}: {e:?}");
    }
}

#[test]
fn pstree_validation_refuses_bad_trees() {
    let cases: Vec<(Vec<Msg>, &str)> = vec![
        (vec![], "no tasks"),
        (
            vec![pstree_entry(10, 0), pstree_entry(10, 10)],
            "appears twice",
        ),
        (
            vec![pstree_entry(10, 0), pstree_entry(11, 99)],
            "not an earlier task",
        ),
        (vec![pstree_entry(0, 0)], "pid 0"),
        (
            vec![Msg::new()
                .varint(1, 10)
                .varint(2, 0)
                .varint(3, 10)
                .varint(4, 10)
                .varint(5, 11)],
            "not among its own threads",
        ),
        (
            vec![pstree_entry(10, 0).varint(5, 10)],
            "repeated thread id 10",
        ),
    ];
    for (entries, want) in cases {
        let err = pstree_of(&entries).unwrap_err();
        assert!(matches!(err, CriuError::Invalid { .. }), "{err:?}");
        assert!(err.to_string().contains(want), "{err} (wanted {want})");
    }
}

// ---- mm ----

fn mm_of(vmas: &[Msg]) -> Result<Mm, CriuError> {
    Mm::from_image(&parse(
        ImageKind::Mm,
        common_file(MM_MAGIC, &[mm_entry(vmas)]),
    )?)
}

#[test]
fn mm_reads_vmas_and_sets_guards_apart() {
    let file_vma = vma(P, 2 * P, VMA_AREA_REGULAR | (1 << 6))
        .varint(9, 0x10)
        .varint(10, 0x8000);
    let guard = vma(3 * P, 4 * P, VMA_AREA_GUARD);
    let mm = mm_of(&[file_vma, anon_vma(2 * P, 8 * P), guard]).unwrap();
    assert_eq!(mm.vmas.len(), 2);
    assert_eq!(mm.guards.len(), 1);
    let v = &mm.vmas[0];
    assert_eq!(
        (v.start, v.end, v.prot, v.flags, v.fd),
        (P, 2 * P, 3, 0x22, -1)
    );
    assert_eq!((v.madv, v.fdflags), (Some(0x10), Some(0x8000)));
    assert!(!v.is_anon_private() && mm.vmas[1].is_anon_private());
    assert_eq!(mm.vma_at(P), Some(0));
    assert_eq!(mm.vma_at(2 * P), Some(1));
    assert_eq!(mm.vma_at(8 * P - 1), Some(1));
    assert_eq!(mm.vma_at(8 * P), None);
    assert_eq!(mm.vma_at(0), None);
}

#[test]
fn mm_validation_refuses_bad_vmas() {
    let cases: Vec<(Vec<Msg>, &str)> = vec![
        (
            vec![anon_vma(P, 3 * P), anon_vma(2 * P, 4 * P)],
            "overlaps or precedes",
        ),
        (
            vec![anon_vma(4 * P, 5 * P), anon_vma(P, 2 * P)],
            "overlaps or precedes",
        ),
        (vec![anon_vma(P + 1, 2 * P)], "not page aligned"),
        (vec![anon_vma(P, 2 * P + 7)], "not page aligned"),
        (vec![anon_vma(2 * P, 2 * P)], "is empty"),
        (vec![anon_vma(3 * P, 2 * P)], "is empty"),
        (vec![vma(P + 3, 2 * P, VMA_AREA_GUARD)], "guard range 0"),
    ];
    for (vmas, want) in cases {
        let err = mm_of(&vmas).unwrap_err();
        assert!(matches!(err, CriuError::Invalid { .. }), "{err:?}");
        assert!(err.to_string().contains(want), "{err} (wanted {want})");
    }
    let two = common_file(MM_MAGIC, &[mm_entry(&[]), mm_entry(&[])]);
    let err = Mm::from_image(&parse(ImageKind::Mm, two).unwrap()).unwrap_err();
    assert!(err.to_string().contains("2 entries"), "{err}");
}

// ---- pagemap ----

fn pagemap_of(entries: &[Msg]) -> Result<Pagemap, CriuError> {
    let mut all = vec![pagemap_head(7)];
    all.extend(entries.iter().cloned());
    Pagemap::from_image(&parse(
        ImageKind::Pagemap,
        common_file(PAGEMAP_MAGIC, &all),
    )?)
}

#[test]
fn pagemap_offsets_count_only_present_entries_in_order() {
    let pm = pagemap_of(&[
        pagemap_entry(P, 2, PE_PRESENT),
        pagemap_entry(4 * P, 1, 0), // zero pages: no data
        pagemap_entry(5 * P, 3, PE_PRESENT | PE_LAZY),
        pagemap_entry(10 * P, 4, PE_PARENT), // in the parent snapshot: no data here
        pagemap_entry(20 * P, 1, PE_LAZY | PE_PRESENT),
    ])
    .unwrap();
    assert_eq!(pm.pages_id, 7);
    assert_eq!(pm.pages_file_name(), "pages-7.img");
    let offsets: Vec<_> = pm.entries.iter().map(|e| e.data_offset).collect();
    assert_eq!(offsets, [Some(0), None, Some(2 * P), None, Some(5 * P)]);
    assert_eq!(pm.stored_bytes, 6 * P);
}

#[test]
fn pagemap_compat_rules_apply() {
    // No flags field: present. in_parent: parent. No nr_pages: compat_nr_pages.
    let old_present = Msg::new().varint(1, P).varint(2, 3);
    let old_parent = Msg::new().varint(1, 8 * P).varint(2, 1).varint(3, 1);
    let zero_flags = Msg::new().varint(1, 9 * P).varint(2, 1).varint(4, 0);
    let pm = pagemap_of(&[old_present, old_parent, zero_flags]).unwrap();
    let e = &pm.entries;
    assert_eq!((e[0].nr_pages, e[0].flags), (3, PE_PRESENT));
    assert_eq!((e[1].nr_pages, e[1].flags), (1, PE_PARENT));
    assert_eq!(e[2].flags, 0, "an explicit zero is not the absent field");
    assert_eq!(pm.stored_bytes, 3 * P);
    // nr_pages (5) wins over compat_nr_pages (2).
    let both = Msg::new()
        .varint(1, P)
        .varint(2, 1)
        .varint(4, 4)
        .varint(5, 9);
    assert_eq!(pagemap_of(&[both]).unwrap().entries[0].nr_pages, 9);
}

#[test]
fn pagemap_validation_refuses_bad_entries() {
    let cases: Vec<(Vec<Msg>, &str)> = vec![
        (
            vec![
                pagemap_entry(P, 4, PE_PRESENT),
                pagemap_entry(3 * P, 1, PE_PRESENT),
            ],
            "overlaps or precedes",
        ),
        (
            vec![
                pagemap_entry(8 * P, 1, PE_PRESENT),
                pagemap_entry(P, 1, PE_PRESENT),
            ],
            "overlaps or precedes",
        ),
        (
            vec![pagemap_entry(P + 8, 1, PE_PRESENT)],
            "not page aligned",
        ),
        (vec![pagemap_entry(P, 0, PE_PRESENT)], "zero pages"),
        (
            vec![pagemap_entry(u64::MAX - P + 1, 2, PE_PRESENT)],
            "overflows",
        ),
        (vec![pagemap_entry(P, 1 << 60, PE_PRESENT)], "overflows"),
        (
            vec![pagemap_entry(P, 1, 1 << 3 | PE_PRESENT)],
            "unknown flags 0x8",
        ),
        (
            vec![pagemap_entry(P, 1, PE_PARENT | PE_PRESENT)],
            "both in the parent and here",
        ),
    ];
    for (entries, want) in cases {
        let err = pagemap_of(&entries).unwrap_err();
        assert!(matches!(err, CriuError::Invalid { .. }), "{err:?}");
        let s = err.to_string();
        assert!(
            s.contains("entry ") && s.contains(want),
            "{s} (wanted {want})"
        );
    }
    let empty = common_file(PAGEMAP_MAGIC, &[]);
    let err = Pagemap::from_image(&parse(ImageKind::Pagemap, empty).unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("starts with a pagemap_head"),
        "{err}"
    );
    let no_vaddr = Msg::new().varint(2, 1);
    let err = pagemap_of(&[no_vaddr]).unwrap_err().to_string();
    assert!(
        err.contains("entry 1 (pagemap_entry): field vaddr (1)"),
        "{err}"
    );
}

// ---- image directory: lazy runs, pages file ----

#[test]
fn lazy_runs_merge_contiguous_entries_and_split_at_vmas() {
    // VMAs [1,5) and [5,9) touch; a present-only entry sits between lazy ones.
    let vmas = [
        anon_vma(P, 5 * P),
        anon_vma(5 * P, 9 * P),
        anon_vma(20 * P, 30 * P),
    ];
    let entries = [
        pagemap_entry(P, 2, PE_PRESENT | PE_LAZY),      // data 0..2
        pagemap_entry(3 * P, 4, PE_PRESENT | PE_LAZY),  // data 2..6, crosses into VMA 1
        pagemap_entry(7 * P, 1, PE_PRESENT),            // data 6..7, not lazy
        pagemap_entry(8 * P, 1, PE_PRESENT | PE_LAZY),  // data 7..8
        pagemap_entry(20 * P, 2, 0),                    // zero pages
        pagemap_entry(22 * P, 3, PE_PRESENT | PE_LAZY), // data 8..11
    ];
    let t = task_dir("runs", &vmas, &entries, 11 * P);
    let dir = ImageDir::open(t.path()).unwrap();
    assert_eq!(dir.pstree().root().pid, 100);
    let mem = dir.task_memory(100).unwrap();
    let runs: Vec<_> = mem
        .lazy_runs
        .iter()
        .map(|r| (r.start / P, r.len / P, r.pages_offset / P, r.vma))
        .collect();
    assert_eq!(
        runs,
        [(1, 4, 0, 0), (5, 2, 4, 1), (8, 1, 7, 1), (22, 3, 8, 2)],
        "(start page, pages, offset page, vma)"
    );
    assert_eq!(mem.lazy_bytes(), 10 * P);
    let pages = mem.open_pages().unwrap();
    assert_eq!(pages.len(), 11 * P);
    // task_dir fills each stored page with its index in the file.
    for run in &mem.lazy_runs {
        let data = pages.run_data(run).unwrap();
        for (i, page) in data.chunks(P as usize).enumerate() {
            let want = (run.pages_offset / P) as u8 + i as u8;
            assert!(page.iter().all(|&b| b == want), "run {run:?} page {i}");
        }
    }
}

#[test]
fn pages_file_of_the_wrong_size_is_refused() {
    let vmas = [anon_vma(P, 9 * P)];
    let entries = [pagemap_entry(P, 3, PE_PRESENT | PE_LAZY)];
    for len in [3 * P - 1, 2 * P, 0, 4 * P] {
        let t = task_dir("short", &vmas, &entries, len);
        let err = ImageDir::open(t.path())
            .unwrap()
            .task_memory(100)
            .unwrap_err();
        assert!(matches!(err, CriuError::Invalid { .. }), "{err:?}");
        assert!(err.path().ends_with("pages-1.img"), "{err}");
        assert!(
            err.to_string().contains(&format!("file is {len} bytes")),
            "{err}"
        );
    }
    let t = task_dir("nopages", &vmas, &entries, 3 * P);
    std::fs::remove_file(t.path().join("pages-1.img")).unwrap();
    let err = ImageDir::open(t.path())
        .unwrap()
        .task_memory(100)
        .unwrap_err();
    assert!(matches!(err, CriuError::Io { .. }) && err.path().ends_with("pages-1.img"));
}

#[test]
fn pages_file_shrunk_after_validation_is_refused_at_map_time() {
    let t = task_dir(
        "shrunk",
        &[anon_vma(P, 9 * P)],
        &[pagemap_entry(P, 3, PE_PRESENT)],
        3 * P,
    );
    let mem = ImageDir::open(t.path()).unwrap().task_memory(100).unwrap();
    t.write("pages-1.img", &[0; 100]);
    let err = mem.open_pages().unwrap_err();
    assert!(err.to_string().contains("file is 100 bytes"), "{err}");
}

#[test]
fn pages_file_reads_are_bounds_checked() {
    let t = task_dir(
        "bounds",
        &[anon_vma(P, 9 * P)],
        &[pagemap_entry(P, 3, PE_PRESENT)],
        3 * P,
    );
    let pages = ImageDir::open(t.path())
        .unwrap()
        .task_memory(100)
        .unwrap()
        .open_pages()
        .unwrap();
    assert_eq!(pages.data(3 * P, 0).unwrap().len(), 0);
    assert_eq!(pages.data(P, 2 * P).unwrap().len() as u64, 2 * P);
    for (off, len) in [(2 * P, P + 1), (3 * P + 1, 0), (u64::MAX, 2), (1, u64::MAX)] {
        let err = pages.data(off, len).unwrap_err();
        assert!(err.to_string().contains("reach past the end"), "{err}");
    }
}

#[test]
fn entries_outside_the_vmas_are_refused() {
    let vmas = [anon_vma(P, 4 * P), anon_vma(5 * P, 8 * P)];
    // Crosses the gap [4, 5).
    let t = task_dir("gap", &vmas, &[pagemap_entry(3 * P, 3, PE_PRESENT)], 3 * P);
    let err = ImageDir::open(t.path())
        .unwrap()
        .task_memory(100)
        .unwrap_err();
    assert!(err.path().ends_with("pagemap-100.img"), "{err}");
    assert!(
        err.to_string().contains("page 0x4000 is in no VMA"),
        "{err}"
    );
    let t = task_dir("beyond", &vmas, &[pagemap_entry(9 * P, 1, 0)], 0);
    let err = ImageDir::open(t.path())
        .unwrap()
        .task_memory(100)
        .unwrap_err();
    assert!(err.to_string().contains("is in no VMA"), "{err}");
}

#[test]
fn unsupported_lazy_entries_are_refused() {
    let file_vma = vma(P, 4 * P, VMA_AREA_REGULAR | (1 << 6));
    let t = task_dir(
        "filevma",
        &[file_vma],
        &[pagemap_entry(P, 1, PE_PRESENT | PE_LAZY)],
        P,
    );
    let err = ImageDir::open(t.path())
        .unwrap()
        .task_memory(100)
        .unwrap_err();
    assert!(err.to_string().contains("not private anonymous"), "{err}");

    let vmas = [anon_vma(P, 4 * P)];
    let t = task_dir("remote", &vmas, &[pagemap_entry(P, 1, PE_LAZY)], 0);
    let err = ImageDir::open(t.path())
        .unwrap()
        .task_memory(100)
        .unwrap_err();
    assert!(
        err.to_string().contains("not stored in this image"),
        "{err}"
    );

    let t = task_dir(
        "parent",
        &vmas,
        &[pagemap_entry(P, 1, PE_LAZY | PE_PARENT)],
        0,
    );
    let err = ImageDir::open(t.path())
        .unwrap()
        .task_memory(100)
        .unwrap_err();
    assert!(err.to_string().contains("parent snapshot"), "{err}");
}

#[test]
fn unknown_pid_is_refused() {
    let t = task_dir("pid", &[anon_vma(P, 2 * P)], &[], 0);
    let dir = ImageDir::open(t.path()).unwrap();
    assert!(dir.task_memory(100).unwrap().lazy_runs.is_empty());
    let err = dir.task_memory(101).unwrap_err();
    assert!(
        err.to_string()
            .contains("pid 101 is not in the process tree"),
        "{err}"
    );
}

#[test]
fn image_dir_refuses_a_broken_inventory_or_tree() {
    let t = task_dir("broken", &[], &[], 0);
    t.write("inventory.img", &inventory_file(&inventory(1)));
    assert!(ImageDir::open(t.path())
        .unwrap_err()
        .to_string()
        .contains("image version 1"));
    t.write("inventory.img", &inventory_file(&inventory(2)));
    t.write("pstree.img", &common_file(PSTREE_MAGIC, &[]));
    assert!(ImageDir::open(t.path())
        .unwrap_err()
        .to_string()
        .contains("no tasks"));
    std::fs::remove_file(t.path().join("inventory.img")).unwrap();
    assert!(matches!(
        ImageDir::open(t.path()),
        Err(CriuError::Io { .. })
    ));
}
