//! `umm run` over the C target programs of `tests/targets/`.
//!
//! Each test runs the target natively first (reference checksum; and the kernel's own view,
//! `registered=0/N`, shows the registration check can tell), then under `umm run`, and asserts:
//! - the program's verdict: exit 0, its `OK` line, the same checksum as natively;
//! - `registered=N/N`: every region it checked carried VmFlags `um` (registered with a uffd for
//!   missing faults) — no other process can do that to its memory;
//! - the manager's counters: `pages_served >= min_served`, where `min_served` (printed by the
//!   target) counts pages that were missing in their own address space when first touched. A
//!   registered missing page can only be filled by the uffd's reader (UFFDIO_COPY/ZEROPAGE), so
//!   without umm serving them that number is unreachable; event counters at least the number of
//!   calls the target made that raise each event on a registered range.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(180);

#[test]
fn interposed_mmap_regions_are_registered_before_first_touch_and_served() {
    let (_dir, native, run, ok) = native_and_managed("registered", "registered", &[], LIMIT);
    // negative control: natively every region reads as unregistered
    assert!(
        native.str("regions").split(',').all(|r| r.ends_with(":0")),
        "native run: {:?}",
        native.fields
    );
    // under umm every way of mapping memory is registered BEFORE its first touch
    for r in ok.str("regions").split(',') {
        assert!(
            r.ends_with(":1"),
            "region {r} was not registered before its first touch\n{}",
            run.context()
        );
    }
    // the regions (~56 MiB) dwarf anything else a small C program maps, so only serving
    // them reaches min_served
    assert!(ok.u64("min_served") * PAGE >= 50 * MIB);
    run.assert_ge("faults", 1, "the target touched registered missing pages");
    run.assert_ge(
        "peak_registered_bytes",
        32 * MIB,
        "two 16 MiB regions mapped through the interposed mmap are alive together",
    );
}

#[test]
fn threads_fault_disjoint_and_shared_pages_of_one_mmap() {
    let (_dir, _native, run, ok) = native_and_managed("threads", "threads", &["16", "96"], LIMIT);
    assert_eq!(ok.u64("threads"), 16);
    let region = ok.u64("region_pages") * PAGE;
    assert!(ok.u64("min_served") * PAGE >= 96 * MIB);
    run.assert_ge(
        "faults",
        1,
        "16 threads first-touched a 96 MiB registered region",
    );
    run.assert_ge(
        "peak_registered_bytes",
        region,
        "the 96 MiB region was registered (the agent interposes mmap)",
    );
}

#[test]
fn fork_storm_children_get_inherited_and_missing_pages() {
    let (_dir, _native, run, ok) =
        native_and_managed("forkstorm", "forkstorm", &["128", "32"], LIMIT);
    let children = ok.u64("children");
    let grand = ok.u64("grandchildren");
    assert_eq!(children, 128);
    assert!(grand >= 16);
    run.assert_ge(
        "events.fork",
        children + grand,
        "every fork of a process with registered memory raises UFFD_EVENT_FORK",
    );
    run.assert_ge(
        "processes",
        1 + children + grand,
        "the parent, every child and grandchild is an address space umm managed",
    );
    // min_served = children * U + grandchildren * D + the parent's own reads at the end: pages
    // missing in each child's own address space, which only a manager holding that child's
    // FORK uffd can fill (so > 32k pages, far beyond what the parent alone could account for)
    assert!(ok.u64("min_served") >= children * 256);
    // ... and the manager served them into the children's own address spaces.
    run.assert_ge(
        "fork_pages_served",
        children * 256,
        "each child touches at least 256 pages missing in its own address space",
    );
}

#[test]
fn layout_storm_remove_reads_zero_never_stale() {
    let (_dir, _native, run, ok) = native_and_managed("layoutstorm", "layoutstorm", &["8"], LIMIT);
    let rounds = ok.u64("rounds");
    assert_eq!(rounds, 8);
    let remaps = ok.u64("remaps");
    assert!(remaps >= 2 * rounds);
    run.assert_ge(
        "events.remap",
        remaps,
        "each mremap move of a registered range raises UFFD_EVENT_REMAP",
    );
    run.assert_ge(
        "events.remove",
        ok.u64("removes").max(rounds),
        "each MADV_DONTNEED/MADV_FREE on a registered range raises UFFD_EVENT_REMOVE",
    );
    run.assert_ge(
        "events.unmap",
        ok.u64("unmaps").max(1),
        "each munmap of a registered range raises UFFD_EVENT_UNMAP",
    );
    run.assert_ge(
        "faults",
        rounds,
        "every round faults fresh and zapped pages",
    );
}

#[test]
fn threads_faulting_same_pages_all_wake() {
    let (_dir, _native, run, ok) =
        native_and_managed("samepage", "samepage", &["32", "100", "64"], LIMIT);
    let rounds = ok.u64("rounds");
    assert_eq!(rounds, 100);
    assert_eq!(ok.u64("min_served"), rounds * ok.u64("pages"));
    assert!(ok.u64("signals_handled") >= 1, "{:?}", ok.fields);
    // the program finished: no thread was left waiting on a fault (32 threads fault each page
    // at once: the copies after the first get EEXIST and need a UFFDIO_WAKE)
    run.assert_ge(
        "events.remove",
        ok.u64("removes"),
        "each round ends with MADV_DONTNEED of the region; churn stacks are zapped too",
    );
    run.assert_ge(
        "faults",
        rounds,
        "every round starts with every page zapped, so at least one fault per round reaches umm",
    );
}

#[test]
fn read_syscall_into_untouched_memory_faults_through_umm() {
    let (_dir, _native, run, ok) = native_and_managed("readinto", "readinto", &[], LIMIT);
    // registered at the end of the program = registered while the kernel copied into the
    // ranges: those copy_to_user faults could only be resolved by the manager
    // parent: r1, r2, r6; child: r6 and r7, a mapping the child made itself (registered
    // through the child's own Register channel before the kernel copied into it)
    let (k, _) = ok.registered();
    assert!(k >= 5, "parent and child checks: {:?}", ok.fields);
    run.assert_ge("events.fork", 1, "the target forks once");
    run.assert_ge("processes", 2, "parent and child are both managed");
    run.assert_ge("faults", 1, "kernel-mode faults reached the manager");
}

#[test]
fn umm_run_exits_with_the_commands_status() {
    require_root_and_uffd();
    let dir = TestDir::new("exitstatus");
    for (label, line, want) in [("exit7", "exit 7", 7), ("kill9", "kill -9 $$", 128 + 9)] {
        let run = umm_run(&dir, label, &["sh", "-c", line], &[], LIMIT);
        assert_eq!(
            run.status.code(),
            Some(want),
            "`sh -c '{line}'`\n{}",
            run.context()
        );
        run.assert_eq(
            "exit_status",
            want as u64,
            "the report records CMD's exit status",
        );
        run.assert_ge("handoffs", 1, "sh was managed");
    }
}

#[test]
fn fork_with_the_manager_out_of_fds_never_leaves_the_parent_stuck() {
    // Every FORK event installs the child's uffd in the manager's fd table. With 40 fds the
    // manager runs out after a dozen children held alive at once: the forking parent is then
    // blocked in fork() until the manager reads the event, which it cannot. The manager must
    // give up on the parent (fail-open: closing its uffd completes the fork) rather than leave
    // it stuck; the program finishes with its memory intact.
    require_root_and_uffd();
    let dir = TestDir::new("forkhold");
    let exe = target("forkhold");
    let cmd = [exe.to_string_lossy().into_owned(), "100".to_string()];
    let native = run_native(&dir, "forkhold-native", &cmd, &[], LIMIT).ok_line("forkhold");
    let (umm, report_path) = umm_run_command(&dir, "forkhold", &cmd);
    let mut limited = std::process::Command::new("prlimit");
    limited
        .arg("--nofile=40:40")
        .arg("--")
        .arg(umm.get_program())
        .args(umm.get_args())
        .current_dir(dir.path());
    let mut p = Proc::spawn(&dir, "forkhold", limited);
    let status = p.wait_bounded(LIMIT);
    p.assert_group_gone();
    let report = Report::load(&report_path).unwrap_or_else(|e| panic!("{e}\n{}", p.context()));
    let run = UmmRun {
        label: "forkhold".into(),
        status,
        stdout: p.stdout(),
        stderr: p.stderr(),
        report,
    };
    assert!(run.status.success(), "{}", run.context());
    let ok = run.ok_line("forkhold");
    assert_eq!(ok.checksum(), native.checksum(), "{}", run.context());
    run.assert_ge("handoffs", 1, "the parent was managed");
    run.assert_ge(
        "events.fork",
        1,
        "forks were followed until the fds ran out",
    );
    run.assert_ge(
        "abandoned",
        1,
        "out of fds, the manager gave up on the forking parent instead of leaving it blocked",
    );
}

#[test]
fn trace_has_a_line_for_every_layout_event_and_served_fault() {
    require_root_and_uffd();
    let dir = TestDir::new("trace");
    let exe = target("forkstorm");
    let report_path = dir.join("trace.report.json");
    let trace_path = dir.join("trace.jsonl");
    let mut c = std::process::Command::new(umm_bin());
    c.arg("run")
        .arg("--report")
        .arg(&report_path)
        .arg("--trace")
        .arg(&trace_path)
        .arg("--agent")
        .arg(agent_lib())
        .arg("--")
        .arg(&exe)
        .arg("32")
        .current_dir(dir.path());
    let mut p = Proc::spawn(&dir, "trace", c);
    let status = p.wait_bounded(LIMIT);
    p.assert_group_gone();
    assert!(status.success(), "{}", p.context());
    let report = Report::load(&report_path).unwrap_or_else(|e| panic!("{e}\n{}", p.context()));
    let text = std::fs::read_to_string(&trace_path).expect("trace file");
    let mut kinds = std::collections::BTreeMap::<String, u64>::new();
    let mut served = 0u64;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("trace line {line:?}: {e}"));
        for field in ["t_us", "space", "pid"] {
            assert!(v[field].is_u64(), "{field} missing in {line}");
        }
        let kind = v["kind"].as_str().expect("kind").to_string();
        if kind == "fault" {
            assert!(v["start"].as_u64().unwrap() % PAGE == 0, "{line}");
            served += v["len"].as_u64().expect("len");
        }
        *kinds.entry(kind).or_default() += 1;
    }
    let n = |k: &str| kinds.get(k).copied().unwrap_or(0);
    assert_eq!(n("fork"), report.u64("events.fork"), "{kinds:?}");
    assert_eq!(n("remove"), report.u64("events.remove"), "{kinds:?}");
    assert_eq!(n("unmap"), report.u64("events.unmap"), "{kinds:?}");
    assert_eq!(n("remap"), report.u64("events.remap"), "{kinds:?}");
    assert!(
        n("fork") >= 32,
        "the target forks 32 children and more: {kinds:?}"
    );
    // Every served fault has its line; faults that needed no copy (EEXIST) have len 0.
    assert!(
        n("fault") >= 1 && n("fault") <= report.u64("faults"),
        "{kinds:?}"
    );
    assert_eq!(served, report.u64("bytes_served"), "{kinds:?}");
    assert!(n("register") >= 1, "registrations are traced: {kinds:?}");
    // umm report --svg draws it: a heat-map cell and a latency bar at least (the trace has
    // faults), no fill line (no restore).
    let marks = report_svg(&dir, &trace_path, &dir.join("trace.svg"));
    assert!(
        marks.heat_cells >= 1 && marks.latency_bars >= 1 && marks.fill_lines == 0,
        "{marks:?}"
    );
}

#[test]
fn umm_run_forwards_sigterm_to_the_command_and_exits_with_its_status() {
    require_root_and_uffd();
    let dir = TestDir::new("forward");
    let script = "trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 0.05; done";
    let (c, report_path) = umm_run_command(&dir, "forward", &["sh", "-c", script]);
    let mut p = Proc::spawn(&dir, "forward", c);
    let ready = poll_until(1200, Duration::from_millis(50), || {
        p.stdout().contains("ready") || p.try_wait().is_some()
    });
    assert!(ready, "the command never started\n{}", p.context());
    // To umm only (not its process group): umm must pass it on to the command.
    p.signal(nix::sys::signal::Signal::SIGTERM);
    let status = p.wait_bounded(LIMIT);
    p.assert_group_gone();
    assert_eq!(status.code(), Some(42), "{}", p.context());
    assert!(p.stdout().contains("got-term"), "{}", p.context());
    let report = Report::load(&report_path).unwrap_or_else(|e| panic!("{e}\n{}", p.context()));
    assert_eq!(report.u64("exit_status"), 42, "{}", report.pretty());
    assert!(
        report.u64("handoffs") >= 1,
        "sh was managed\n{}",
        report.pretty()
    );
}

#[test]
fn forked_children_in_a_pid_namespace_register_their_own_mappings() {
    // In a container the fault's thread id and the agent's pid are the namespace's names, not
    // the manager's: the manager must still find the forked child (its uffd came by FORK) when
    // the child opens its Register channel, or the child's new mapping (readinto's r7) is not
    // registered before the kernel copies into it.
    require_root_and_uffd();
    let dir = TestDir::new("pidns");
    let exe = target("readinto");
    let cmd = [
        "unshare".to_string(),
        "--pid".into(),
        "--fork".into(),
        "--mount".into(),
        "--mount-proc".into(),
        exe.to_string_lossy().into_owned(),
    ];
    let run = umm_run(&dir, "pidns", &cmd, &[], LIMIT);
    run.assert_success();
    let ok = run.ok_line("readinto");
    run.assert_all_registered(&ok);
    let (k, _) = ok.registered();
    assert!(k >= 5, "parent and child checks: {:?}", ok.fields);
    run.assert_ge("events.fork", 1, "the target forks");
    run.assert_ge(
        "register_requests",
        1,
        "the child's mapping came through Register",
    );
}
