//! umm — a non-cooperative userfaultfd memory manager.
//!
//! The library holds the pieces the manager binary (`umm`) and the agent
//! (`libumm_agent.so`) share:
//! - [`uffd`]: the kernel ABI (ioctls, feature negotiation, batched event reads);
//! - [`sys`]: thin safe wrappers for the other raw calls (procfs, pidfd, sockets, fds);
//! - [`layout`]: the model of one address space, pure data;
//! - [`protocol`]: the agent↔manager wire format;
//! - [`netproto`]: the page-server wire format (`umm page-server`, `umm restore --source`);
//! - [`image`]: memory images (what `umm snapshot` writes and `umm restore` serves);
//! - [`source`]: where page contents come from;
//! - [`criu`]: a validating reader of CRIU images (tree, VMAs, lazy page runs, pages file);
//! - [`restore`]: the restorer's side of a lazy restore (hand a process's uffd to `umm restore`).
//!
//! `unsafe` lives only in `uffd` and `sys`.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod criu;
pub mod image;
pub mod layout;
pub mod netproto;
pub mod protocol;
pub mod restore;
pub mod snapshot;
pub mod source;
pub mod sys;
pub mod uffd;

/// The page size umm works in. x86_64 and aarch64 (4 KiB kernels) only.
pub const PAGE_SIZE: u64 = 4096;

/// Round `addr` down to a page boundary.
pub const fn page_floor(addr: u64) -> u64 {
    addr & !(PAGE_SIZE - 1)
}

/// Round `addr` up to a page boundary (saturating at the top of the address space).
pub const fn page_ceil(addr: u64) -> u64 {
    match addr.checked_add(PAGE_SIZE - 1) {
        Some(a) => a & !(PAGE_SIZE - 1),
        None => page_floor(u64::MAX),
    }
}

/// Human-readable byte counts (`10.0 MiB`).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
