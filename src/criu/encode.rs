//! Test-only: a tiny protobuf encoder and builders for CRIU images, so tests can make small
//! images (good and broken) in memory or in a temporary directory.

use std::fs;
use std::path::{Path, PathBuf};

use super::{
    IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC, INVENTORY_MAGIC, MM_MAGIC, PAGEMAP_MAGIC, PSTREE_MAGIC,
    VMA_ANON_PRIVATE, VMA_AREA_REGULAR,
};

pub fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// A message under construction: fields appended in call order.
#[derive(Clone, Default)]
pub struct Msg(pub Vec<u8>);

impl Msg {
    pub fn new() -> Msg {
        Msg(Vec::new())
    }

    fn key(mut self, number: u32, wire_type: u8) -> Msg {
        self.0
            .extend(varint(u64::from(number) << 3 | u64::from(wire_type)));
        self
    }

    pub fn varint(self, number: u32, v: u64) -> Msg {
        let mut m = self.key(number, 0);
        m.0.extend(varint(v));
        m
    }

    pub fn sint64(self, number: u32, v: i64) -> Msg {
        self.varint(number, ((v << 1) ^ (v >> 63)) as u64)
    }

    pub fn fixed64(self, number: u32, v: u64) -> Msg {
        let mut m = self.key(number, 1);
        m.0.extend(v.to_le_bytes());
        m
    }

    pub fn fixed32(self, number: u32, v: u32) -> Msg {
        let mut m = self.key(number, 5);
        m.0.extend(v.to_le_bytes());
        m
    }

    pub fn bytes(self, number: u32, b: &[u8]) -> Msg {
        let mut m = self.key(number, 2);
        m.0.extend(varint(b.len() as u64));
        m.0.extend(b);
        m
    }

    pub fn msg(self, number: u32, inner: &Msg) -> Msg {
        self.bytes(number, &inner.0)
    }

    /// Raw bytes as they are (for malformed messages).
    pub fn raw(mut self, b: &[u8]) -> Msg {
        self.0.extend(b);
        self
    }
}

/// A file: the magics, then each entry with its u32 length.
pub fn image(magics: &[u32], entries: &[Msg]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in magics {
        out.extend(m.to_le_bytes());
    }
    for e in entries {
        out.extend((e.0.len() as u32).to_le_bytes());
        out.extend(&e.0);
    }
    out
}

pub fn inventory_file(inv: &Msg) -> Vec<u8> {
    image(&[INVENTORY_MAGIC], std::slice::from_ref(inv))
}

pub fn common_file(magic: u32, entries: &[Msg]) -> Vec<u8> {
    image(&[IMG_COMMON_MAGIC, magic], entries)
}

pub fn service_file(magic: u32, entries: &[Msg]) -> Vec<u8> {
    image(&[IMG_SERVICE_MAGIC, magic], entries)
}

/// An inventory as CRIU 4.2 writes it (the fields a reader needs).
pub fn inventory(version: u64) -> Msg {
    let ids = Msg::new()
        .varint(1, 1)
        .varint(2, 1)
        .varint(3, 1)
        .varint(4, 1);
    Msg::new()
        .varint(1, version)
        .varint(2, 1)
        .msg(3, &ids)
        .varint(4, 1)
        .bytes(13, b"00000000-0000-0000-0000-000000000000")
}

pub fn pstree_entry(pid: u32, ppid: u32) -> Msg {
    Msg::new()
        .varint(1, pid.into())
        .varint(2, ppid.into())
        .varint(3, pid.into())
        .varint(4, pid.into())
        .varint(5, pid.into())
}

/// A private anonymous read-write VMA.
pub fn anon_vma(start: u64, end: u64) -> Msg {
    vma(start, end, VMA_AREA_REGULAR | VMA_ANON_PRIVATE)
}

pub fn vma(start: u64, end: u64, status: u32) -> Msg {
    Msg::new()
        .varint(1, start)
        .varint(2, end)
        .varint(3, 0)
        .varint(4, 0)
        .varint(5, 3)
        .varint(6, 0x22)
        .varint(7, status.into())
        .sint64(8, -1)
}

pub fn mm_entry(vmas: &[Msg]) -> Msg {
    let mut m = Msg::new().varint(1, 0x1000).varint(13, 0);
    for v in vmas {
        m = m.msg(14, v);
    }
    m
}

pub fn pagemap_head(pages_id: u32) -> Msg {
    Msg::new().varint(1, pages_id.into())
}

/// A pagemap entry as CRIU 4.2 writes it: compat_nr_pages 0, flags, nr_pages.
pub fn pagemap_entry(vaddr: u64, nr_pages: u64, flags: u32) -> Msg {
    Msg::new()
        .varint(1, vaddr)
        .varint(2, 0)
        .varint(4, flags.into())
        .varint(5, nr_pages)
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "umm-criu-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A one-task image directory: pid 100, the given VMAs and pagemap entries, pages-1.img
/// holding `pages_len` bytes where each stored page is filled with its index in the file.
pub fn task_dir(tag: &str, vmas: &[Msg], entries: &[Msg], pages_len: u64) -> TempDir {
    let t = TempDir::new(tag);
    t.write("inventory.img", &inventory_file(&inventory(2)));
    t.write(
        "pstree.img",
        &common_file(PSTREE_MAGIC, &[pstree_entry(100, 0)]),
    );
    t.write("mm-100.img", &common_file(MM_MAGIC, &[mm_entry(vmas)]));
    let mut pm = vec![pagemap_head(1)];
    pm.extend(entries.iter().cloned());
    t.write("pagemap-100.img", &common_file(PAGEMAP_MAGIC, &pm));
    let pages: Vec<u8> = (0..pages_len)
        .map(|i| (i / crate::PAGE_SIZE) as u8)
        .collect();
    t.write("pages-1.img", &pages);
    t
}
