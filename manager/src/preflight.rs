//! Before serving anything: can this process serve other processes' memory at all? One clear
//! line saying what is missing and what to do, instead of every target being refused later.

use nix::errno::Errno;
use umm::uffd::{Features, Uffd};

/// Ok when this process can open a full userfaultfd and enable the non-cooperative events
/// (what `umm run`, `umm daemon` and `umm restore` need); else the line to print. The probe
/// uffd is of this process's own mm and registers nothing.
pub fn can_serve() -> Result<(), String> {
    let uid = nix::unistd::geteuid();
    let (uffd, _) = Uffd::open().map_err(|e| match e.errno {
        Errno::ENOSYS => "this kernel has no userfaultfd (built without CONFIG_USERFAULTFD): \
                          umm cannot serve memory here; use a kernel that has it (see \
                          umm --version)"
            .to_string(),
        Errno::EPERM | Errno::EACCES => format!(
            "uid {uid} may not open a userfaultfd ({e}; vm.unprivileged_userfaultfd is 0 and \
             /dev/userfaultfd is not accessible): run umm as root, or give it CAP_SYS_PTRACE"
        ),
        _ => format!("cannot open a userfaultfd: {e} (see umm --version)"),
    })?;
    match uffd.api(Features::NON_COOPERATIVE) {
        Ok(_) => Ok(()),
        Err(e) if e.errno == Errno::EPERM => Err(format!(
            "uid {uid} lacks CAP_SYS_PTRACE, which UFFD_FEATURE_EVENT_FORK needs (to follow \
             fork in served processes): run umm as root, or give it CAP_SYS_PTRACE"
        )),
        Err(e) => Err(format!(
            "{e}: umm needs the non-cooperative events (Linux 4.11+ with THREAD_ID, 4.14+; \
             see umm --version)"
        )),
    }
}
