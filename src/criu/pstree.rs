//! `pstree.img`: the process tree, root first, parents before their children.

use std::collections::HashSet;
use std::path::Path;

use super::image::{ImageFile, ImageKind};
use super::wire::{fields, required, DecodeError};
use super::CriuError;

/// One task of the tree (`pstree_entry`). Pids are in the dumped tree's pid namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PstreeEntry {
    pub pid: u32,
    pub ppid: u32,
    pub pgid: u32,
    pub sid: u32,
    /// Thread ids, the main thread (`pid`) among them; `[0]` for a zombie.
    pub threads: Vec<u32>,
}

/// The validated tree: at least one task, unique pids, every task but the root a child of an
/// earlier one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pstree {
    pub entries: Vec<PstreeEntry>,
}

impl PstreeEntry {
    /// Decode one `pstree_entry` message.
    pub fn decode(buf: &[u8]) -> Result<PstreeEntry, DecodeError> {
        let (mut pid, mut ppid, mut pgid, mut sid) = (None, None, None, None);
        let mut threads = Vec::new();
        for field in fields(buf) {
            let field = field?;
            match field.number {
                1 => pid = Some(field.u32("pid")?),
                2 => ppid = Some(field.u32("ppid")?),
                3 => pgid = Some(field.u32("pgid")?),
                4 => sid = Some(field.u32("sid")?),
                5 => field.push_u32s("threads", &mut threads)?,
                _ => {}
            }
        }
        Ok(PstreeEntry {
            pid: required(pid, 1, "pid")?,
            ppid: required(ppid, 2, "ppid")?,
            pgid: required(pgid, 3, "pgid")?,
            sid: required(sid, 4, "sid")?,
            threads,
        })
    }
}

impl Pstree {
    /// Read and validate `pstree.img`.
    pub fn read(path: &Path) -> Result<Pstree, CriuError> {
        let file = ImageFile::read(path, ImageKind::Pstree)?;
        Pstree::from_image(&file)
    }

    pub(crate) fn from_image(file: &ImageFile) -> Result<Pstree, CriuError> {
        let entries = (0..file.len())
            .map(|i| file.decode(i, "pstree_entry", PstreeEntry::decode))
            .collect::<Result<Vec<_>, _>>()?;
        let tree = Pstree { entries };
        tree.validate()
            .map_err(|detail| CriuError::invalid(&file.path, detail))?;
        Ok(tree)
    }

    fn validate(&self) -> Result<(), String> {
        if self.entries.is_empty() {
            return Err("the process tree has no tasks".into());
        }
        let mut seen = HashSet::new();
        for (i, e) in self.entries.iter().enumerate() {
            if e.pid == 0 {
                return Err(format!("entry {i}: pid 0"));
            }
            if i > 0 && !seen.contains(&e.ppid) {
                return Err(format!(
                    "entry {i}: pid {} has parent {}, which is not an earlier task of the tree",
                    e.pid, e.ppid
                ));
            }
            if !seen.insert(e.pid) {
                return Err(format!("entry {i}: pid {} appears twice", e.pid));
            }
            // A zombie: CRIU (4.2, seen in a real dump) never reads a dead task's thread
            // ids and writes the one thread as 0.
            if e.threads == [0] {
                continue;
            }
            if !e.threads.is_empty() && !e.threads.contains(&e.pid) {
                return Err(format!(
                    "entry {i}: pid {} is not among its own threads {:?}",
                    e.pid, e.threads
                ));
            }
            let mut tids = HashSet::new();
            if let Some(t) = e.threads.iter().find(|&&t| t == 0 || !tids.insert(t)) {
                return Err(format!(
                    "entry {i}: pid {}: bad or repeated thread id {t}",
                    e.pid
                ));
            }
        }
        Ok(())
    }

    /// The root task (the one `criu dump -t` named).
    pub fn root(&self) -> &PstreeEntry {
        &self.entries[0]
    }

    pub fn get(&self, pid: u32) -> Option<&PstreeEntry> {
        self.entries.iter().find(|e| e.pid == pid)
    }

    pub fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.entries.iter().map(|e| e.pid)
    }
}
