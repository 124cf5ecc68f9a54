//! Thin safe wrappers for the raw calls umm needs besides the userfaultfd ABI: procfs parsing
//! and reading, pidfds, SCM_RIGHTS on unix sockets, process spawning, resource limits.
//! With [`crate::uffd`], the only home of the library's `unsafe`.

pub mod acl;
pub mod activation;
pub mod fd;
pub mod inject;
pub mod mmap;
pub mod proc;
pub mod process;
pub mod ptrace;
pub mod socket;
