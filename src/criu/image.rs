//! The framing of a CRIU protobuf image file: magic numbers, then length-prefixed entries.

use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::wire::DecodeError;
use super::{
    CriuError, IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC, INVENTORY_MAGIC, MM_MAGIC, PAGEMAP_MAGIC,
    PSTREE_MAGIC,
};

/// Largest metadata image read (a hostile or wrong file must not cost unbounded memory). A
/// pagemap entry is ~16 bytes and a VMA ~50: this allows millions of either.
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// The image types this reader knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Inventory,
    Pstree,
    Mm,
    Pagemap,
}

impl ImageKind {
    pub fn magic(self) -> u32 {
        match self {
            ImageKind::Inventory => INVENTORY_MAGIC,
            ImageKind::Pstree => PSTREE_MAGIC,
            ImageKind::Mm => MM_MAGIC,
            ImageKind::Pagemap => PAGEMAP_MAGIC,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Inventory => "inventory",
            ImageKind::Pstree => "pstree",
            ImageKind::Mm => "mm",
            ImageKind::Pagemap => "pagemap",
        }
    }

    /// Every image but the inventory starts with the common magic.
    fn has_common_magic(self) -> bool {
        self != ImageKind::Inventory
    }
}

/// A name for a magic number found where another was expected (a few common image types, so
/// that "you opened the wrong file" is obvious).
fn magic_name(magic: u32) -> Option<&'static str> {
    Some(match magic {
        IMG_COMMON_MAGIC => "common image magic",
        IMG_SERVICE_MAGIC => "service file magic",
        INVENTORY_MAGIC => "inventory",
        PSTREE_MAGIC => "pstree",
        MM_MAGIC => "mm",
        PAGEMAP_MAGIC => "pagemap",
        0x5505_3847 => "core",
        0x5443_2030 => "ids",
        0x5621_3732 => "fdinfo",
        0x5630_3138 => "files",
        0x5140_3912 => "fs",
        0x5709_3306 => "stats",
        _ => return None,
    })
}

fn describe_magic(magic: u32) -> String {
    match magic_name(magic) {
        Some(name) => format!("{magic:#010x} ({name})"),
        None => format!("{magic:#010x}"),
    }
}

/// One image file read into memory, its framing checked: the byte ranges of its entries.
#[derive(Debug)]
pub(crate) struct ImageFile {
    pub path: PathBuf,
    pub kind: ImageKind,
    data: Vec<u8>,
    entries: Vec<Range<usize>>,
}

impl ImageFile {
    /// Read `path` and check it is an image of `kind`.
    pub fn read(path: &Path, kind: ImageKind) -> Result<ImageFile, CriuError> {
        let io_err = |err| CriuError::Io {
            path: path.to_path_buf(),
            err,
        };
        let file = File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(CriuError::format(path, "not a regular file"));
        }
        if meta.len() > MAX_IMAGE_BYTES {
            return Err(CriuError::format(
                path,
                format!(
                    "file is {} bytes, more than the {MAX_IMAGE_BYTES} a {} image may have",
                    meta.len(),
                    kind.name()
                ),
            ));
        }
        let mut data = Vec::with_capacity(meta.len() as usize);
        // `take` bounds the read even if the file grows after the size check.
        file.take(MAX_IMAGE_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(io_err)?;
        if data.len() as u64 > MAX_IMAGE_BYTES {
            return Err(CriuError::format(
                path,
                "file grew past the size limit while read",
            ));
        }
        ImageFile::parse(path, kind, data)
    }

    /// Check the framing of `data`, the contents of `path`.
    pub fn parse(path: &Path, kind: ImageKind, data: Vec<u8>) -> Result<ImageFile, CriuError> {
        let u32_at = |pos: usize| -> Option<u32> {
            let bytes = data.get(pos..pos.checked_add(4)?)?;
            Some(u32::from_le_bytes(bytes.try_into().ok()?))
        };
        let mut pos = 0;
        if kind.has_common_magic() {
            let first = u32_at(0).ok_or_else(|| {
                CriuError::format(
                    path,
                    format!("{} bytes: too short for the magic numbers", data.len()),
                )
            })?;
            if first == kind.magic() {
                return Err(CriuError::format(
                    path,
                    format!(
                        "{} image without the common magic {IMG_COMMON_MAGIC:#010x} (image \
                         version 1, too old: not supported)",
                        kind.name()
                    ),
                ));
            }
            if first != IMG_COMMON_MAGIC {
                return Err(CriuError::format(
                    path,
                    format!(
                        "bad magic {}: expected the common image magic {IMG_COMMON_MAGIC:#010x}",
                        describe_magic(first)
                    ),
                ));
            }
            pos = 4;
        }
        let magic = u32_at(pos).ok_or_else(|| {
            CriuError::format(
                path,
                format!("{} bytes: too short for the magic numbers", data.len()),
            )
        })?;
        if magic != kind.magic() {
            return Err(CriuError::format(
                path,
                format!(
                    "wrong image type: magic {}, expected {:#010x} ({})",
                    describe_magic(magic),
                    kind.magic(),
                    kind.name()
                ),
            ));
        }
        pos += 4;

        let mut entries = Vec::new();
        while pos < data.len() {
            let left = data.len() - pos;
            let len = u32_at(pos).ok_or_else(|| {
                CriuError::format(
                    path,
                    format!(
                        "entry {} at byte {pos}: truncated length ({left} bytes left, 4 needed)",
                        entries.len()
                    ),
                )
            })? as usize;
            if len > left - 4 {
                return Err(CriuError::format(
                    path,
                    format!(
                        "entry {} at byte {pos}: length {len} runs past the end of the file ({} \
                         bytes left)",
                        entries.len(),
                        left - 4
                    ),
                ));
            }
            entries.push(pos + 4..pos + 4 + len);
            pos += 4 + len;
        }
        Ok(ImageFile {
            path: path.to_path_buf(),
            kind,
            data,
            entries,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The bytes of entry `index`.
    pub fn entry(&self, index: usize) -> &[u8] {
        &self.data[self.entries[index].clone()]
    }

    /// Decode entry `index` as a `message` with `decode`, naming file and entry on error.
    pub fn decode<T>(
        &self,
        index: usize,
        message: &'static str,
        decode: impl FnOnce(&[u8]) -> Result<T, DecodeError>,
    ) -> Result<T, CriuError> {
        decode(self.entry(index)).map_err(|err| CriuError::Decode {
            path: self.path.clone(),
            entry: index,
            message,
            err: Box::new(err),
        })
    }

    /// Require exactly `n` entries (the inventory and mm images hold one).
    pub fn expect_entries(&self, n: usize) -> Result<(), CriuError> {
        if self.len() != n {
            return Err(CriuError::format(
                &self.path,
                format!(
                    "{} entries, a {} image has exactly {n}",
                    self.len(),
                    self.kind.name()
                ),
            ));
        }
        Ok(())
    }
}
