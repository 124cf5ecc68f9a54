//! The C API for restorers written in C: `umm_restore_handoff`, exported by libumm_agent.so.
//!
//! ```c
//! /* 0 on success (the manager fills the regions from the image from now on), -1 on failure
//!  * with a one-line reason in errbuf (NUL-terminated, truncated to errlen). regions holds
//!  * nregions (start, len) pairs: each exactly a region of the image's manifest, mapped by
//!  * this process and untouched. */
//! int umm_restore_handoff(const char *socket_path, const char *image_dir,
//!                         const uint64_t *regions, size_t nregions, unsigned timeout_ms,
//!                         char *errbuf, size_t errlen);
//! ```
//!
//! Loading the library does nothing by itself unless `UMM_SOCKET` is set (the agent's
//! constructor): a restorer links it (or dlopens it) without UMM_SOCKET in its environment.

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::Duration;

/// See the module documentation.
///
/// # Safety
/// `socket_path` and `image_dir` are NUL-terminated strings; `regions` points at `2 * nregions`
/// readable u64 values; `errbuf` points at `errlen` writable bytes (or is NULL).
#[no_mangle]
pub unsafe extern "C" fn umm_restore_handoff(
    socket_path: *const c_char,
    image_dir: *const c_char,
    regions: *const u64,
    nregions: usize,
    timeout_ms: c_uint,
    errbuf: *mut c_char,
    errlen: usize,
) -> c_int {
    let result = catch_unwind(AssertUnwindSafe(|| {
        if socket_path.is_null() || image_dir.is_null() || (regions.is_null() && nregions > 0) {
            return Err("a NULL argument".to_string());
        }
        // SAFETY: the caller passes NUL-terminated strings (see the function's contract).
        let socket = unsafe { CStr::from_ptr(socket_path) };
        // SAFETY: as above.
        let image = unsafe { CStr::from_ptr(image_dir) };
        // SAFETY: the caller passes 2 * nregions readable u64s.
        let flat = unsafe { std::slice::from_raw_parts(regions, nregions.saturating_mul(2)) };
        let pairs: Vec<(u64, u64)> = flat.chunks_exact(2).map(|c| (c[0], c[1])).collect();
        let timeout = Duration::from_millis(if timeout_ms == 0 {
            5000
        } else {
            timeout_ms as u64
        });
        umm::restore::handoff(
            Path::new(std::ffi::OsStr::from_bytes(socket.to_bytes())),
            Path::new(std::ffi::OsStr::from_bytes(image.to_bytes())),
            &pairs,
            timeout,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }));
    let err = match result {
        Ok(Ok(())) => return 0,
        Ok(Err(e)) => e,
        Err(_) => "internal error in umm_restore_handoff".to_string(),
    };
    if !errbuf.is_null() && errlen > 0 {
        let bytes = err.as_bytes();
        let n = bytes.len().min(errlen - 1);
        // SAFETY: the caller's errbuf has errlen writable bytes; n + 1 <= errlen.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), errbuf.cast::<u8>(), n);
            *errbuf.add(n) = 0;
        }
    }
    -1
}
