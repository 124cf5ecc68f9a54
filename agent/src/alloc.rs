//! The malloc family, interposed: each call goes to the next definition (glibc's malloc, or
//! an allocator library such as jemalloc), and afterwards the agent registers memory the
//! allocator mapped behind the interposed `mmap` — glibc maps with its own internal calls:
//!
//! - **brk growth**: the main arena grows `[heap]` with `brk`, which makes a new VMA next to
//!   the registered one. `sbrk(0)` reads glibc's cached break (no system call); when it is
//!   above the highest break registered so far, the new part is registered.
//! - **mmapped chunks** (glibc only): a large block gets a mapping of its own. Its chunk
//!   header says so (`IS_MMAPPED`); the whole mapping is registered before the block is
//!   handed out. (`realloc` of such a block uses mremap inside glibc: the same check.)
//! - **arena heaps** (glibc only): a thread's arena lives in 64 MiB-aligned heaps that glibc
//!   maps as a PROT_NONE reservation and grows with `mprotect` (a registered reservation stays
//!   registered). A block from a non-main arena (`NON_MAIN_ARENA` in its header) names its
//!   heap by alignment; the first block seen from a heap registers the whole reservation.
//!   Seen heaps are kept in a small fixed table; a heap glibc unmaps and maps again at the same
//!   address is left to the manager's rescan.
//!
//! The chunk headers are read only when the next `malloc` is glibc's (`malloc` and
//! `__libc_malloc` resolve to the same address); for other allocators only the brk check runs
//! (jemalloc maps through the interposed `mmap`).
//!
//! Rules: the next definitions are found with `dlsym(RTLD_NEXT)`, once; a call that arrives
//! while its thread is resolving (dlsym allocating on an error path) fails with ENOMEM instead
//! of recursing. The checks allocate nothing, never panic across the boundary, keep errno, and
//! run only after a handoff. Nothing is ever freed here, so `free` is not interposed.

use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicUsize, Ordering};

use crate::register;
use crate::sys;

const PAGE: usize = umm::PAGE_SIZE as usize;
/// glibc's `HEAP_MAX_SIZE` on 64-bit targets (2 × DEFAULT_MMAP_THRESHOLD_MAX): arena heaps
/// are this large and aligned to it.
const ARENA_HEAP: usize = 64 << 20;
/// Chunk header bits (glibc malloc.c).
const IS_MMAPPED: usize = 0x2;
const NON_MAIN_ARENA: usize = 0x4;
const SIZE_BITS: usize = 0x7;

type MallocFn = unsafe extern "C" fn(usize) -> *mut c_void;
type CallocFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type ReallocArrayFn = unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void;
type MemalignFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type PosixMemalignFn = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> c_int;

/// One next definition, found on first use.
struct Next {
    name: &'static CStr,
    addr: AtomicUsize,
}

/// Not looked up yet (0 is "looked up, absent").
const UNRESOLVED: usize = usize::MAX;

impl Next {
    const fn new(name: &'static CStr) -> Next {
        Next {
            name,
            addr: AtomicUsize::new(UNRESOLVED),
        }
    }

    /// The address of the next definition, or None (absent, or this thread is resolving).
    fn get(&self) -> Option<usize> {
        let a = self.addr.load(Ordering::Acquire);
        if a != UNRESOLVED {
            return (a != 0).then_some(a);
        }
        let a = resolve(self.name)?;
        self.addr.store(a, Ordering::Release);
        (a != 0).then_some(a)
    }
}

/// The thread inside `dlsym` (0: none). Another thread resolving at the same time resolves
/// too (the result is the same); only this thread's recursion is refused.
static RESOLVING: AtomicI32 = AtomicI32::new(0);

fn resolve(name: &CStr) -> Option<usize> {
    let me = sys::raw_gettid();
    if RESOLVING.load(Ordering::Acquire) == me {
        return None;
    }
    let outer = RESOLVING.swap(me, Ordering::AcqRel);
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name only looks the symbol up.
    let a = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    RESOLVING.store(outer, Ordering::Release);
    Some(a)
}

static MALLOC: Next = Next::new(c"malloc");
static CALLOC: Next = Next::new(c"calloc");
static REALLOC: Next = Next::new(c"realloc");
static REALLOCARRAY: Next = Next::new(c"reallocarray");
static MEMALIGN: Next = Next::new(c"memalign");
static ALIGNED_ALLOC: Next = Next::new(c"aligned_alloc");
static POSIX_MEMALIGN: Next = Next::new(c"posix_memalign");
static VALLOC: Next = Next::new(c"valloc");
static PVALLOC: Next = Next::new(c"pvalloc");
static LIBC_MALLOC: Next = Next::new(c"__libc_malloc");

/// Whether the next malloc is glibc's: 0 unknown, 1 yes, 2 no.
static GLIBC: AtomicU8 = AtomicU8::new(0);

fn next_is_glibc() -> bool {
    match GLIBC.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let (Some(m), Some(l)) = (MALLOC.get(), LIBC_MALLOC.get()) else {
                return false;
            };
            // Other allocators alias `__libc_malloc` to their malloc too (tcmalloc does): the
            // definition must also live in glibc itself, or its blocks have no glibc headers.
            let yes = m == l && in_libc(m);
            GLIBC.store(if yes { 1 } else { 2 }, Ordering::Relaxed);
            yes
        }
    }
}

/// Whether the code at `addr` belongs to glibc's `libc.so.6`.
fn in_libc(addr: usize) -> bool {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr only reads the loader's tables and fills `info`.
    if unsafe { libc::dladdr(addr as *const c_void, info.as_mut_ptr()) } == 0 {
        return false;
    }
    // SAFETY: dladdr succeeded, so `info` is filled; dli_fname is a NUL-terminated path (or
    // null).
    let name = unsafe { info.assume_init().dli_fname };
    if name.is_null() {
        return false;
    }
    // SAFETY: a NUL-terminated string owned by the loader, alive while libc is loaded.
    let name = unsafe { CStr::from_ptr(name) }.to_bytes();
    let base = name.rsplit(|&b| b == b'/').next().unwrap_or(name);
    base.starts_with(b"libc.so")
}

/// Resolve everything at once (the constructor, before the program's threads exist).
pub(crate) fn resolve_all() {
    for n in [
        &MALLOC,
        &CALLOC,
        &REALLOC,
        &REALLOCARRAY,
        &MEMALIGN,
        &ALIGNED_ALLOC,
        &POSIX_MEMALIGN,
        &VALLOC,
        &PVALLOC,
    ] {
        n.get();
    }
    next_is_glibc();
}

/// The highest program break registered so far (0: none yet).
static BRK_REGISTERED: AtomicUsize = AtomicUsize::new(0);

/// Remember the break at the handoff: the manager's handoff scan registered `[heap]` up to it.
pub(crate) fn note_break_at_handoff() {
    BRK_REGISTERED.store(current_break(), Ordering::Relaxed);
}

fn current_break() -> usize {
    // SAFETY: sbrk(0) only reads the cached break (a brk(0) system call the first time).
    let b = unsafe { libc::sbrk(0) } as usize;
    if b == usize::MAX {
        0
    } else {
        b
    }
}

/// Arena heaps already registered, by base address (0: free slot).
const HEAP_SLOTS: usize = 256;
const HEAP_PROBES: usize = 8;
static HEAPS: [AtomicUsize; HEAP_SLOTS] = [const { AtomicUsize::new(0) }; HEAP_SLOTS];

/// True the first time `base` is seen (then it is in the table, or the table evicted another).
fn first_sight_of_heap(base: usize) -> bool {
    let home = (base / ARENA_HEAP) % HEAP_SLOTS;
    for i in 0..HEAP_PROBES {
        let slot = &HEAPS[(home + i) % HEAP_SLOTS];
        match slot.compare_exchange(0, base, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(cur) if cur == base => return false,
            Err(_) => {}
        }
    }
    // A full neighbourhood: take the home slot (the heap it held is registered again when
    // seen, at the cost of one more Register).
    HEAPS[home].store(base, Ordering::Release);
    true
}

/// After a successful allocation returning `p`: register what the allocator mapped for it.
fn after_alloc(p: *mut c_void) {
    if p.is_null() || register::HANDOFF_PID.load(Ordering::Relaxed) == 0 {
        return;
    }
    let body = std::panic::catch_unwind(|| {
        check_break();
        if next_is_glibc() {
            check_chunk(p as usize);
        }
    });
    if body.is_err() {
        register::give_up_after_panic();
    }
}

/// Register `[BRK_REGISTERED, break)` when the break went up; follow it down too, so that a
/// trimmed heap that grows again is registered again.
fn check_break() {
    let now = current_break();
    let seen = BRK_REGISTERED.load(Ordering::Relaxed);
    if now == 0 || now == seen {
        return;
    }
    if BRK_REGISTERED
        .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        // Another thread is on it.
        return;
    }
    if now > seen && seen != 0 {
        let start = seen & !(PAGE - 1);
        register::after_map(start as u64, (now - start) as u64);
    }
}

/// glibc's chunk header of the block at `p`: a fresh mapping of its own, or a block of an
/// arena heap not seen yet, is registered.
fn check_chunk(p: usize) {
    // SAFETY: `p` was just returned by glibc's allocator; the two words before it are the
    // chunk's prev_size and size fields, inside the allocation.
    let (prev_size, size) = unsafe {
        let hdr = (p - 2 * std::mem::size_of::<usize>()) as *const usize;
        (hdr.read(), hdr.add(1).read())
    };
    if size & IS_MMAPPED != 0 {
        // The mapping starts prev_size bytes before the chunk (an aligned block's offset).
        let chunk = p - 2 * std::mem::size_of::<usize>();
        let start = chunk.wrapping_sub(prev_size) & !(PAGE - 1);
        let end = chunk.saturating_add(size & !SIZE_BITS);
        if start < end {
            register::after_map(start as u64, (end - start) as u64);
        }
    } else if size & NON_MAIN_ARENA != 0 {
        let base = p & !(ARENA_HEAP - 1);
        if first_sight_of_heap(base) {
            register::after_map(base as u64, ARENA_HEAP as u64);
        }
    }
}

/// Call the next definition (`f` reads the resolved address), then check.
macro_rules! forward {
    ($next:expr, $ty:ty, |$f:ident| $call:expr) => {{
        match $next.get() {
            Some(addr) => {
                // SAFETY: `addr` is the next definition of this very function, found by
                // dlsym, so it has this signature.
                let $f: $ty = unsafe { std::mem::transmute::<usize, $ty>(addr) };
                // SAFETY: the caller's arguments, passed on unchanged.
                let p = unsafe { $call };
                after_alloc(p);
                p
            }
            None => {
                sys::set_errno(libc::ENOMEM);
                std::ptr::null_mut()
            }
        }
    }};
}

/// `malloc(3)`.
#[no_mangle]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    forward!(MALLOC, MallocFn, |f| f(size))
}

/// `calloc(3)`.
#[no_mangle]
pub extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    forward!(CALLOC, CallocFn, |f| f(n, size))
}

/// `realloc(3)`.
#[no_mangle]
pub extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    forward!(REALLOC, ReallocFn, |f| f(p, size))
}

/// `reallocarray(3)`.
#[no_mangle]
pub extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    forward!(REALLOCARRAY, ReallocArrayFn, |f| f(p, n, size))
}

/// `memalign(3)`.
#[no_mangle]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    forward!(MEMALIGN, MemalignFn, |f| f(align, size))
}

/// `aligned_alloc(3)`.
#[no_mangle]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    forward!(ALIGNED_ALLOC, MemalignFn, |f| f(align, size))
}

/// `valloc(3)`.
#[no_mangle]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    forward!(VALLOC, MallocFn, |f| f(size))
}

/// `pvalloc(3)`.
#[no_mangle]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    forward!(PVALLOC, MallocFn, |f| f(size))
}

/// `posix_memalign(3)`.
#[no_mangle]
pub extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    let Some(addr) = POSIX_MEMALIGN.get() else {
        return libc::ENOMEM;
    };
    // SAFETY: the next definition of posix_memalign, found by dlsym.
    let f = unsafe { std::mem::transmute::<usize, PosixMemalignFn>(addr) };
    // SAFETY: the caller's arguments, passed on unchanged.
    let r = unsafe { f(out, align, size) };
    if r == 0 && !out.is_null() {
        // SAFETY: on success the allocator stored the block's address in `*out`.
        after_alloc(unsafe { out.read() });
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heap_is_new_once_and_the_table_never_refuses() {
        let base = 0x7f00_0000_0000usize & !(ARENA_HEAP - 1);
        assert!(first_sight_of_heap(base));
        assert!(!first_sight_of_heap(base));
        // More heaps than slots in one neighbourhood: each is new the first time.
        for i in 1..=(HEAP_PROBES * 2) {
            assert!(first_sight_of_heap(base + i * ARENA_HEAP * HEAP_SLOTS));
        }
    }

    #[test]
    fn libc_code_is_told_from_other_code() {
        assert!(in_libc(libc::free as *const () as usize));
        // Code of this test binary, and of no object at all.
        assert!(!in_libc(first_sight_of_heap as *const () as usize));
        assert!(!in_libc(16));
    }

    #[test]
    fn the_next_malloc_of_the_test_binary_is_glibc() {
        // The test binary does not interpose malloc: RTLD_NEXT from it finds glibc's.
        assert!(MALLOC.get().is_some());
        assert!(next_is_glibc());
    }
}
