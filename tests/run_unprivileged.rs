//! An unprivileged target (uid 65534) under `umm run`.
//!
//! With `vm.unprivileged_userfaultfd=0` and `/dev/userfaultfd` mode 0600, uid 65534 cannot get a
//! full userfaultfd by itself. The manager (root) grants `/dev/userfaultfd` to its own tree, so
//! the agent in the target makes a full uffd from the granted device fd. The tests prove it:
//! natively (no umm) the same uid has nothing registered; under umm every checked region is
//! registered (`um`) and `read(2)` into untouched registered memory succeeds — which a
//! `UFFD_USER_MODE_ONLY` uffd would turn into EFAULT — and the manager's counters show the pages
//! were served, forked children included.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(180);
const SETPRIV: [&str; 5] = ["setpriv", "--reuid", "65534", "--regid", "65534"];

/// Copy target programs into a directory uid 65534 can reach, plus a world-writable TMPDIR.
fn unprivileged_setup(dir: &TestDir, names: &[&str]) -> (Vec<PathBuf>, PathBuf) {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).expect("mkdir bin");
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod bin");
    let exes = names
        .iter()
        .map(|n| {
            let dst = bin.join(n);
            fs::copy(target(n), &dst).expect("copy target");
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).expect("chmod target");
            dst
        })
        .collect();
    let tmp = dir.join("tmp");
    fs::create_dir_all(&tmp).expect("mkdir tmp");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).expect("chmod tmp");
    (exes, tmp)
}

fn as_nobody(exe: &Path, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = SETPRIV.iter().map(|s| s.to_string()).collect();
    v.push("--clear-groups".into());
    v.push(exe.to_string_lossy().into_owned());
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

#[test]
fn unprivileged_target_uid_65534_is_managed() {
    require_root_and_uffd();
    let dir = TestDir::new("unpriv-fork");
    let (exes, tmp) = unprivileged_setup(&dir, &["forkstorm"]);
    let tmpdir = tmp.to_string_lossy().into_owned();
    let env = [("TMPDIR", tmpdir.as_str())];
    let cmd = as_nobody(&exes[0], &["32", "8"]);

    let native = run_native(&dir, "forkstorm-native", &cmd, &env, LIMIT).ok_line("forkstorm");
    assert_eq!(native.u64("uid"), 65534);
    assert_eq!(
        native.registered().0,
        0,
        "uid 65534 cannot register anything by itself"
    );

    let run = umm_run(&dir, "forkstorm", &cmd, &env, LIMIT);
    run.assert_success();
    let ok = run.ok_line("forkstorm");
    assert_eq!(
        ok.u64("uid"),
        65534,
        "the target ran unprivileged\n{}",
        run.context()
    );
    assert_eq!(ok.checksum(), native.checksum());
    run.assert_all_registered(&ok);
    let forks = ok.u64("children") + ok.u64("grandchildren");
    run.assert_ge(
        "handoffs",
        1,
        "the unprivileged target handed over a uffd made from the granted device",
    );
    run.assert_ge(
        "events.fork",
        forks,
        "the unprivileged target's forks were followed",
    );
    run.assert_ge(
        "processes",
        1 + forks,
        "every child of the unprivileged target was managed",
    );
    run.assert_ge(
        "pages_served",
        ok.u64("min_served"),
        "pages missing in the unprivileged children's own address spaces were served by umm",
    );
}

#[test]
fn unprivileged_target_read_syscall_faults_are_served() {
    require_root_and_uffd();
    let dir = TestDir::new("unpriv-read");
    let (exes, tmp) = unprivileged_setup(&dir, &["readinto"]);
    let tmpdir = tmp.to_string_lossy().into_owned();
    let env = [("TMPDIR", tmpdir.as_str())];
    let cmd = as_nobody(&exes[0], &[]);

    let native = run_native(&dir, "readinto-native", &cmd, &env, LIMIT).ok_line("readinto");
    assert_eq!(
        native.registered().0,
        0,
        "uid 65534 cannot register anything by itself"
    );

    let run = umm_run(&dir, "readinto", &cmd, &env, LIMIT);
    run.assert_success();
    let ok = run.ok_line("readinto");
    assert_eq!(ok.checksum(), native.checksum());
    // registered AND read(2) into the untouched ranges succeeded: a full uffd, not a
    // user-mode-only one (which fails kernel-mode faults with EFAULT)
    run.assert_all_registered(&ok);
    run.assert_ge(
        "pages_served",
        ok.u64("min_served"),
        "the kernel's copy_to_user faults in the unprivileged target were served by umm",
    );
    run.assert_ge("events.fork", 1, "the target forks once");
}
