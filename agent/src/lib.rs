//! libumm_agent.so — the LD_PRELOAD agent of umm. See `agent/README.md` and umm-agent(7).
//!
//! Before `main`, a constructor connects to the manager at `$UMM_SOCKET`, opens a userfaultfd
//! for this process (or asks the manager for a `/dev/userfaultfd` grant) and hands it over;
//! after that, the interposed `mmap`, `mmap64` and `mremap` tell the manager about new
//! private anonymous memory (a forked child on a channel of its own, see `child.rs`), and so
//! do the interposed malloc family (`alloc.rs`: brk growth, glibc's own mmaps) and
//! `pthread_create` (`threads.rs`: thread stacks). Every
//! failure is reported in one stderr line and the program runs unmanaged, unless
//! `UMM_REQUIRE=1` asks for exit status 1 instead.
//!
//! No panic crosses an `extern "C"` boundary, and the interposed calls never allocate.

#![deny(unsafe_op_in_unsafe_fn)]

mod alloc;
mod attach;
mod child;
mod data;
mod register;
mod restore_api;
mod sys;
mod threads;

use std::ffi::{c_int, c_long, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs before `main` (and before the constructors of the program's own objects).
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = umm_agent_init;

extern "C" fn umm_agent_init() {
    if let Err(payload) = catch_unwind(attach::run) {
        let _ = catch_unwind(AssertUnwindSafe(|| attach::internal_error(&*payload)));
    }
}

/// The raw `mmap(2)`; -1 (MAP_FAILED) with errno set on failure, as glibc's `syscall` does.
pub(crate) fn raw_mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: i64,
) -> *mut c_void {
    // SAFETY: the caller's arguments, passed on as glibc's mmap passes them (every one widened
    // to a full register); the kernel validates them and maps nothing on failure.
    unsafe {
        libc::syscall(
            libc::SYS_mmap,
            addr,
            len,
            prot as c_long,
            flags as c_long,
            fd as c_long,
            offset as c_long,
        ) as *mut c_void
    }
}

fn interposed_mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: i64,
) -> *mut c_void {
    let mut result = libc::MAP_FAILED;
    let body = catch_unwind(AssertUnwindSafe(|| {
        result = raw_mmap(addr, len, prot, flags, fd, offset);
        if result != libc::MAP_FAILED && register::wants_mmap(prot, flags) {
            register::after_map(result as u64, len as u64);
        }
    }));
    if body.is_err() {
        register::give_up_after_panic();
    }
    result
}

/// `mmap(2)`, then Register of a new private anonymous mapping with the manager.
#[no_mangle]
pub extern "C" fn mmap(
    addr: *mut c_void,
    len: libc::size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off_t,
) -> *mut c_void {
    interposed_mmap(addr, len, prot, flags, fd, offset)
}

/// `mmap64`: the same call (64-bit `off_t` on every supported target).
#[no_mangle]
pub extern "C" fn mmap64(
    addr: *mut c_void,
    len: libc::size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off64_t,
) -> *mut c_void {
    interposed_mmap(addr, len, prot, flags, fd, offset)
}

/// `mremap(2)`, then Register of the resulting range. C declares it variadic; the optional
/// fifth argument is taken as a plain pointer (same registers on x86_64 and aarch64) and, as
/// glibc does, only read when MREMAP_FIXED is set.
#[no_mangle]
pub extern "C" fn mremap(
    old_address: *mut c_void,
    old_size: libc::size_t,
    new_size: libc::size_t,
    flags: c_int,
    new_address: *mut c_void,
) -> *mut c_void {
    interposed_mremap(old_address, old_size, new_size, flags, new_address)
}

fn interposed_mremap(
    old_address: *mut c_void,
    old_size: usize,
    new_size: usize,
    flags: c_int,
    new_address: *mut c_void,
) -> *mut c_void {
    let mut result = libc::MAP_FAILED;
    let body = catch_unwind(AssertUnwindSafe(|| {
        let new_address = if flags & libc::MREMAP_FIXED != 0 {
            new_address
        } else {
            std::ptr::null_mut()
        };
        // SAFETY: the caller's arguments, passed on as glibc's mremap passes them; the kernel
        // validates them and changes nothing on failure.
        result = unsafe {
            libc::syscall(
                libc::SYS_mremap,
                old_address,
                old_size,
                new_size,
                flags as c_long,
                new_address,
            ) as *mut c_void
        };
        // The agent cannot tell what the old mapping was (the manager checks); it only skips
        // results that add no address range: a shrink or no-op in place.
        let in_place_shrink = result == old_address && new_size <= old_size;
        if result != libc::MAP_FAILED && !in_place_shrink {
            register::after_map(result as u64, new_size as u64);
        }
    }));
    if body.is_err() {
        register::give_up_after_panic();
    }
    result
}
