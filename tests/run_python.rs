//! `umm run` over python and a shell pipeline.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(300);

/// `py_alloc.py 256` natively (computed once when the test was written; the script also checks
/// itself against an independent regeneration of its data).
const PY_256_CHECKSUM: &str = "4744c5e5fd0a4e9c";
const PY_256_OBJECTS: u64 = 1_486_525;
/// `py_alloc.py 64` natively.
const PY_64_CHECKSUM: &str = "505ef348cd46809b";

#[test]
fn python_256mib_checksums_and_is_served_by_umm() {
    require_root_and_uffd();
    let dir = TestDir::new("python");
    let script = target_source("py_alloc.py").to_string_lossy().into_owned();
    // negative control for the registration check: natively no object is in registered memory
    let native = run_native(
        &dir,
        "py_alloc-native",
        &[PYTHON, &script, "16"],
        &[],
        LIMIT,
    );
    let native = native.ok_line("py_alloc");
    assert_eq!(
        native.registered().0,
        0,
        "natively nothing is registered: {:?}",
        native.fields
    );

    let run = umm_run(&dir, "py_alloc", &[PYTHON, &script, "256"], &[], LIMIT);
    run.assert_success();
    let ok = run.ok_line("py_alloc");
    assert_eq!(
        ok.checksum(),
        PY_256_CHECKSUM,
        "python's data differs under umm\n{}",
        run.context()
    );
    assert_eq!(ok.u64("objects"), PY_256_OBJECTS);
    // the kernel's view: the arenas holding a sample of the objects are registered with a uffd
    // (python maps them with mmap64, which the agent must interpose as well as mmap)
    run.assert_all_registered(&ok);
    run.assert_ge("handoffs", 1, "python's agent handed its uffd over");
    run.assert_ge("faults", 1, "python faulted registered pages");
    // python's memory at handoff is ~10 MiB; 200 MiB can only come from the pymalloc arenas it
    // mmap()s afterwards (small objects live there), which the agent must have registered and
    // the manager served page by page
    run.assert_ge(
        "pages_served",
        200 * MIB / PAGE,
        "~256 MiB of small objects live in pymalloc arenas mapped through the interposed mmap",
    );
    run.assert_ge("bytes_served", 200 * MIB, "as pages_served");
    run.assert_ge(
        "peak_registered_bytes",
        200 * MIB,
        "the arenas holding ~256 MiB of objects are all alive at the end",
    );
}

/// A deterministic text file of `lines` lines for `sort`.
fn sort_input(lines: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(lines as usize * 40);
    let mut x = 0x1234_5678_9abc_def0u64;
    for i in 0..lines {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(
            format!("{:016x} {} {:x}\n", x, i, x.rotate_left(17) & 0xffff_ffff).as_bytes(),
        );
    }
    out
}

#[test]
fn exec_chain_shell_python_sort() {
    require_root_and_uffd();
    let dir = TestDir::new("execchain");
    let input = write_file(&dir, "input.txt", &sort_input(400_000));
    let env = [("LC_ALL", "C")];
    let native = run_native(
        &dir,
        "sort-native",
        &[
            "sh",
            "-c",
            &format!("sort '{}' | sha256sum", input.display()),
        ],
        &env,
        LIMIT,
    );
    assert!(native.status.success(), "native sort: {}", native.stderr);
    let want = native.stdout.trim().to_string();
    assert!(
        want.ends_with(" -") && want.len() > 64,
        "native sha256sum: {want}"
    );

    let script = target_source("py_alloc.py");
    let line = format!(
        "{PYTHON} '{}' 64; sort '{}' | sha256sum",
        script.display(),
        input.display()
    );
    let run = umm_run(&dir, "execchain", &["sh", "-c", &line], &env, LIMIT);
    run.assert_success();
    let ok = run.ok_line("py_alloc");
    assert_eq!(
        ok.checksum(),
        PY_64_CHECKSUM,
        "python's data differs under umm\n{}",
        run.context()
    );
    run.assert_all_registered(&ok);
    assert!(
        run.stdout.lines().any(|l| l.trim() == want),
        "sort | sha256sum under umm differs from the native `{want}`\n{}",
        run.context()
    );
    run.assert_ge(
        "handoffs",
        4,
        "sh, python, sort and sha256sum each load the agent after exec and hand a uffd over",
    );
    // dash vforks a simple command (python: no event) but forks both members of a pipeline
    run.assert_ge("events.fork", 2, "sh forks sort and sha256sum");
    run.assert_ge("processes", 4, "sh and the three programs it ran");
    run.assert_ge(
        "pages_served",
        48 * MIB / PAGE,
        "python's 64 MiB of small objects live in arenas the manager must serve",
    );
}
