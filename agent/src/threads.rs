//! `pthread_create`, interposed: glibc maps a new thread's stack with its own internal `mmap`,
//! which the interposed symbol never sees. After a handoff, the new thread starts in a
//! trampoline that registers its own stack (the range `pthread_getattr_np` reports, which is
//! exactly the stack's VMA) before it calls the program's start routine. The pages glibc
//! touched before that (the thread's descriptor and TLS at the top of the stack) are in the
//! VMA when it is registered, so they count as covered; what the routine touches is served.
//!
//! Before a handoff (or when the next `pthread_create` cannot be found) nothing changes.
//! A stack the program supplied itself (`pthread_attr_setstack`) is registered the same way:
//! the manager registers only what is private anonymous memory.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::register;

type StartFn = unsafe extern "C-unwind" fn(*mut c_void) -> *mut c_void;
type CreateFn = unsafe extern "C" fn(
    *mut libc::pthread_t,
    *const libc::pthread_attr_t,
    StartFn,
    *mut c_void,
) -> c_int;

/// The next `pthread_create` (0: not looked up yet).
static NEXT: AtomicUsize = AtomicUsize::new(0);

fn next_create() -> Option<CreateFn> {
    let mut a = NEXT.load(Ordering::Acquire);
    if a == 0 {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name only looks the symbol up.
        a = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_create".as_ptr()) } as usize;
        NEXT.store(a, Ordering::Release);
    }
    // SAFETY: the next definition of pthread_create (found by dlsym) has this signature; a
    // start routine declared "C-unwind" is passed the same way as a "C" one.
    (a != 0).then(|| unsafe { std::mem::transmute::<usize, CreateFn>(a) })
}

/// What the trampoline needs to start the program's routine.
struct Start {
    routine: StartFn,
    arg: *mut c_void,
}

/// `pthread_create(3)`.
#[no_mangle]
pub extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    routine: StartFn,
    arg: *mut c_void,
) -> c_int {
    let Some(create) = next_create() else {
        return libc::EAGAIN;
    };
    if register::HANDOFF_PID.load(Ordering::Relaxed) == 0 {
        // SAFETY: the caller's arguments, passed on unchanged.
        return unsafe { create(thread, attr, routine, arg) };
    }
    let start = Box::into_raw(Box::new(Start { routine, arg }));
    // SAFETY: the caller's thread and attr; the trampoline takes ownership of `start`.
    let r = unsafe { create(thread, attr, trampoline, start.cast()) };
    if r != 0 {
        // SAFETY: no thread was created, so `start` is still ours alone.
        drop(unsafe { Box::from_raw(start) });
    }
    r
}

/// The new thread's first frame: register its stack, then run the program's routine. It is
/// "C-unwind" because `pthread_exit` and cancellation unwind through it (it holds nothing
/// that needs dropping by then).
unsafe extern "C-unwind" fn trampoline(start: *mut c_void) -> *mut c_void {
    // SAFETY: `start` is the Box made by pthread_create above, handed to this thread only.
    let Start { routine, arg } = *unsafe { Box::from_raw(start.cast::<Start>()) };
    if std::panic::catch_unwind(register_own_stack).is_err() {
        register::give_up_after_panic();
    }
    // SAFETY: the program's own start routine and argument.
    unsafe { routine(arg) }
}

/// Register the calling thread's stack. Keeps errno (the routine may not expect it changed).
fn register_own_stack() {
    let saved = crate::sys::errno();
    if let Some((low, len)) = own_stack() {
        register::after_map(low as u64, len as u64);
    }
    crate::sys::set_errno(saved);
}

/// `[low, low + len)` of the calling thread's stack.
fn own_stack() -> Option<(usize, usize)> {
    // SAFETY: pthread_attr_t is plain data, initialised by pthread_getattr_np before use.
    let mut attr: libc::pthread_attr_t = unsafe { std::mem::zeroed() };
    // SAFETY: pthread_getattr_np fills `attr` for the calling thread.
    if unsafe { libc::pthread_getattr_np(libc::pthread_self(), &mut attr) } != 0 {
        return None;
    }
    let mut low: *mut c_void = std::ptr::null_mut();
    let mut len: usize = 0;
    // SAFETY: reads the stack fields of the initialised `attr`.
    let r = unsafe { libc::pthread_attr_getstack(&attr, &mut low, &mut len) };
    // SAFETY: `attr` was initialised by pthread_getattr_np and is destroyed once.
    unsafe { libc::pthread_attr_destroy(&mut attr) };
    (r == 0 && len > 0).then_some((low as usize, len))
}
