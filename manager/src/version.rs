//! `umm --version`: the version, then what this kernel offers umm, found by probing. Runs
//! without privileges; a probe that needs them says "unknown (needs ...)".

use std::fmt::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use umm::sys::proc::{MapsQuery, PageMap};
use umm::uffd::{Features, ProbeVia, Uffd};

/// CAP_SYS_PTRACE's bit in the capability sets of /proc/PID/status.
const CAP_SYS_PTRACE: u32 = 19;

/// The whole `--version` text (clap prints it after nothing else).
pub fn long_version() -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "kernel: {}", kernel_release());
    for (name, value) in kernel_features() {
        let _ = writeln!(out, "{name}: {value}");
    }
    out.trim_end().to_string()
}

fn kernel_release() -> String {
    match std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        Ok(r) => format!("Linux {}", r.trim()),
        Err(e) => format!("unknown (/proc/sys/kernel/osrelease: {e})"),
    }
}

/// One `name: value` line per fact, in a stable order (tests and scripts read them).
pub fn kernel_features() -> Vec<(&'static str, String)> {
    let mut lines = Vec::new();
    lines.push(("vm.unprivileged_userfaultfd", unprivileged_sysctl()));
    lines.push(("/dev/userfaultfd", dev_userfaultfd()));
    let ptrace = has_cap_sys_ptrace();
    match Uffd::probe_kernel() {
        Ok(p) => {
            let via = match p.via {
                ProbeVia::Syscall => "yes (userfaultfd(2))",
                ProbeVia::DevUserfaultfd => "yes (/dev/userfaultfd)",
                ProbeVia::UserModeOnly => {
                    "user-mode-only (serving other processes needs root, or CAP_SYS_PTRACE, \
                     or access to /dev/userfaultfd)"
                }
            };
            lines.push(("userfaultfd for this user", via.to_string()));
            lines.push((
                "uffd features",
                format!("{:#x} {}", p.api.available.bits(), p.api.available),
            ));
            let missing = Features::NON_COOPERATIVE.difference(p.api.available);
            lines.push((
                "non-cooperative events",
                if missing.is_empty() {
                    "all (FORK, REMAP, REMOVE, UNMAP, THREAD_ID)".to_string()
                } else {
                    format!("missing {missing}: umm cannot follow these layout changes")
                },
            ));
            lines.push(("uffd api ioctls", p.api.ioctls.names().join("|")));
            lines.push(("uffd range ioctls", p.range_ioctls.names().join("|")));
        }
        Err(e) => {
            let value = match e.errno {
                nix::errno::Errno::ENOSYS => {
                    "none: this kernel has no userfaultfd (CONFIG_USERFAULTFD=n)".to_string()
                }
                nix::errno::Errno::EPERM | nix::errno::Errno::EACCES => format!(
                    "unknown (needs root, CAP_SYS_PTRACE or access to /dev/userfaultfd: {e})"
                ),
                _ => format!("unknown ({e})"),
            };
            lines.push(("userfaultfd for this user", value));
        }
    }
    lines.push((
        "EVENT_FORK for this process",
        match ptrace {
            Some(true) => "yes (CAP_SYS_PTRACE)".to_string(),
            Some(false) => "no (needs CAP_SYS_PTRACE: run umm as root)".to_string(),
            None => "unknown (cannot read /proc/self/status)".to_string(),
        },
    ));
    lines.push(("PROCMAP_QUERY", procmap_query()));
    lines.push(("PAGEMAP_SCAN", pagemap_scan()));
    lines
}

fn unprivileged_sysctl() -> String {
    match std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd") {
        Ok(v) if v.trim() == "0" => "0 (unprivileged processes get user-mode-only uffds)".into(),
        Ok(v) => v.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "absent".into(),
        Err(e) => format!("unknown ({e})"),
    }
}

fn dev_userfaultfd() -> String {
    let meta = match std::fs::metadata("/dev/userfaultfd") {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return "absent (Linux 6.1+ with CONFIG_USERFAULTFD has it)".into()
        }
        Err(e) => return format!("unknown ({e})"),
    };
    let access = match Uffd::open_device() {
        Ok(_) => "this user can open it".to_string(),
        Err(e) => format!("this user cannot open it ({})", e.errno.desc()),
    };
    format!(
        "present (mode {:o}, uid {}), {access}",
        meta.permissions().mode() & 0o7777,
        meta.uid()
    )
}

/// Whether CAP_SYS_PTRACE is in this process's effective set.
fn has_cap_sys_ptrace() -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    let caps = u64::from_str_radix(hex.trim(), 16).ok()?;
    Some(caps & (1 << CAP_SYS_PTRACE) != 0)
}

fn procmap_query() -> String {
    let answer = MapsQuery::open(std::process::id()).and_then(|q| q.at_or_after(0));
    match answer {
        Ok(_) => "yes".into(),
        Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => "no (Linux 6.11+)".into(),
        Err(e) => format!("unknown ({e})"),
    }
}

fn pagemap_scan() -> String {
    let page = umm::PAGE_SIZE;
    // Any page-aligned range of this process will do: the stack's own page is mapped.
    let here = &page as *const u64 as u64 & !(page - 1);
    let mut out = Vec::new();
    match PageMap::open(std::process::id())
        .and_then(|m| m.populated_by_scan(here..here + page, &mut out))
    {
        Ok(true) => "yes".into(),
        Ok(false) => "no (Linux 6.7+)".into(),
        Err(e) => format!("unknown ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_probe_line_has_a_value() {
        let lines = kernel_features();
        for want in [
            "vm.unprivileged_userfaultfd",
            "/dev/userfaultfd",
            "userfaultfd for this user",
            "EVENT_FORK for this process",
            "PROCMAP_QUERY",
            "PAGEMAP_SCAN",
        ] {
            let (_, v) = lines
                .iter()
                .find(|(n, _)| *n == want)
                .unwrap_or_else(|| panic!("no {want} line in {lines:?}"));
            assert!(!v.is_empty(), "{want} is empty");
        }
    }
}
