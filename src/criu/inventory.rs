//! `inventory.img`: the image version and the root task's kernel-object ids.

use std::path::Path;

use super::image::{ImageFile, ImageKind};
use super::wire::{fields, required, DecodeError};
use super::{CriuError, IMAGES_VERSION_V1_1};

/// The ids of the root task's shared kernel objects (`task_kobj_ids_entry`, the fields this
/// reader keeps: tasks with equal `vm_id` share one address space).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootIds {
    pub vm_id: u32,
    pub files_id: u32,
    pub fs_id: u32,
    pub sighand_id: u32,
}

/// The decoded `inventory_entry` (fields this reader keeps; others are skipped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inventory {
    pub img_version: u32,
    pub fdinfo_per_id: Option<bool>,
    pub root_ids: Option<RootIds>,
    pub ns_per_id: Option<bool>,
    pub root_cg_set: Option<u32>,
    /// The dumping host's uptime at dump time, as CRIU wrote it; informational.
    pub dump_uptime: Option<u64>,
    /// Field 13: the id of the `criu dump` run (a UUID string in CRIU 4.2 images).
    pub dump_run_id: Option<String>,
}

impl Inventory {
    /// Read and check `inventory.img`: one entry, image version 2.
    pub fn read(path: &Path) -> Result<Inventory, CriuError> {
        let file = ImageFile::read(path, ImageKind::Inventory)?;
        Inventory::from_image(&file)
    }

    pub(crate) fn from_image(file: &ImageFile) -> Result<Inventory, CriuError> {
        file.expect_entries(1)?;
        let inv = file.decode(0, "inventory_entry", Inventory::decode)?;
        if inv.img_version != IMAGES_VERSION_V1_1 {
            return Err(CriuError::invalid(
                &file.path,
                format!(
                    "image version {}: this reader supports version {IMAGES_VERSION_V1_1} \
                     (CRIU 1.x and later)",
                    inv.img_version
                ),
            ));
        }
        Ok(inv)
    }

    /// Decode one `inventory_entry` message.
    pub fn decode(buf: &[u8]) -> Result<Inventory, DecodeError> {
        let mut img_version = None;
        let mut inv = Inventory {
            img_version: 0,
            fdinfo_per_id: None,
            root_ids: None,
            ns_per_id: None,
            root_cg_set: None,
            dump_uptime: None,
            dump_run_id: None,
        };
        for field in fields(buf) {
            let field = field?;
            match field.number {
                1 => img_version = Some(field.u32("img_version")?),
                2 => inv.fdinfo_per_id = Some(field.bool("fdinfo_per_id")?),
                3 => {
                    let ids = field.bytes("root_ids")?;
                    inv.root_ids = Some(
                        RootIds::decode(ids).map_err(|e| e.inside("root_ids (3)".to_string()))?,
                    );
                }
                4 => inv.ns_per_id = Some(field.bool("ns_per_id")?),
                5 => inv.root_cg_set = Some(field.u32("root_cg_set")?),
                8 => inv.dump_uptime = Some(field.u64("dump_uptime")?),
                13 => inv.dump_run_id = Some(field.string("dump_criu_run_id")?),
                _ => {}
            }
        }
        inv.img_version = required(img_version, 1, "img_version")?;
        Ok(inv)
    }
}

impl RootIds {
    /// Decode one `task_kobj_ids_entry` message.
    pub fn decode(buf: &[u8]) -> Result<RootIds, DecodeError> {
        let (mut vm, mut files, mut fs, mut sighand) = (None, None, None, None);
        for field in fields(buf) {
            let field = field?;
            match field.number {
                1 => vm = Some(field.u32("vm_id")?),
                2 => files = Some(field.u32("files_id")?),
                3 => fs = Some(field.u32("fs_id")?),
                4 => sighand = Some(field.u32("sighand_id")?),
                _ => {}
            }
        }
        Ok(RootIds {
            vm_id: required(vm, 1, "vm_id")?,
            files_id: required(files, 2, "files_id")?,
            fs_id: required(fs, 3, "fs_id")?,
            sighand_id: required(sighand, 4, "sighand_id")?,
        })
    }
}
