//! Chaos: targets killed at random points, storms of forks, threads and signals, the manager
//! itself killed, thousands of attach/detach cycles (issue 6).
//!
//! Every test checks the programs' own verdicts (OK lines, checksums, every page verified by
//! the targets) and the manager's counters, and that no task is left in D state. Counts come
//! from the environment so that `make soak` can raise them: `UMM_CHAOS_ITERATIONS` (random
//! kills), `UMM_ATTACH_CYCLES` (attach/detach cycles), `UMM_CHAOS_SEED` (repeat a run).

mod common;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::*;

const LIMIT: Duration = Duration::from_secs(300);
/// How long a victim may take to reach the state in which it is killed (bounded wait).
const READY_WAIT: Duration = Duration::from_secs(60);

/// Wait (bounded) until `p` printed `needle`; false if it exited first or never did.
fn wait_for_output(p: &mut Proc, needle: &str, limit: Duration) -> bool {
    let tries = (limit.as_millis() / 2).max(1) as u32;
    poll_until(tries, Duration::from_millis(2), || {
        p.stdout().contains(needle) || p.try_wait().is_some()
    }) && p.stdout().contains(needle)
}

/// SIGKILL a process group, give its members (bounded) time to finish dying, then check that
/// none is left, in D state or at all.
fn kill_group(p: &mut Proc) {
    p.kill();
    let pgid = p.pid;
    poll_until(1000, Duration::from_millis(10), || {
        group_members(pgid).iter().all(|m| m.1 == 'Z')
    });
    p.assert_group_gone();
}

/// Run `verify` against the daemon: it must exit 0 with every page right and registered.
/// Returns its min_served.
fn fresh_target_is_served(dir: &TestDir, d: &UmmDaemon, label: &str) -> u64 {
    let mut p = Proc::spawn(dir, label, d.served(target("verify"), &["64"]));
    let st = p.wait_bounded(LIMIT);
    assert!(
        st.success(),
        "{label}: a fresh target under the daemon: {} (UMM_REQUIRE=1: exit 1 = not managed)\n{}\n{}",
        describe(&st),
        p.context(),
        d.proc.context()
    );
    p.assert_group_gone();
    let ok = OkLine::find(&p.stdout(), "verify")
        .unwrap_or_else(|| panic!("{label}: no OK line\n{}", p.context()));
    assert_eq!(ok.registered(), (1, 1), "{label}: {:?}", ok.fields);
    ok.u64("min_served")
}

#[derive(Clone, Copy, Debug)]
enum Moment {
    /// At once after the spawn: before or during the agent's handshake.
    AtSpawn,
    /// A few milliseconds after the spawn: around the handshake.
    NearHandshake,
    /// While its threads fault (and zap) a registered region.
    MidFault,
    /// While it forks children (and grandchildren) that fault inherited and fresh memory.
    MidForkStorm,
}

#[test]
fn targets_killed_at_random_points_leave_the_daemon_serving_others_with_nothing_leaked() {
    require_root_and_uffd();
    let iterations = env_count("UMM_CHAOS_ITERATIONS", 120);
    let dir = TestDir::new("chaos-kills");
    let mut d = UmmDaemon::start(&dir);
    let mut chaos = Chaos::new("random kills");
    let started = Instant::now();

    // The daemon's RSS once it has served a target (allocator arenas, histogram, slabs).
    let mut min_served = fresh_target_is_served(&dir, &d, "warmup");
    let mut handed = 1u64; // targets certainly handed over (fresh ones, and RUNNING victims)
    d.assert_fds_back("the warm-up target");
    let rss_start = rss_kib(d.pid());

    let storm = target("storm");
    let forkloop = target("forkloop");
    let mut moments = [0usize; 4];
    for i in 0..iterations {
        let moment = match chaos.below(4) {
            0 => Moment::AtSpawn,
            1 => Moment::NearHandshake,
            2 => Moment::MidFault,
            _ => Moment::MidForkStorm,
        };
        let label = format!("victim{i}");
        let cmd = match moment {
            Moment::MidForkStorm => d.served(&forkloop, &["0", "8"]),
            _ => d.served(&storm, &["4", "64", "-"]),
        };
        let mut victim = Proc::spawn(&dir, &label, cmd);
        match moment {
            Moment::AtSpawn => {}
            Moment::NearHandshake => std::thread::sleep(Duration::from_micros(chaos.below(6000))),
            Moment::MidFault | Moment::MidForkStorm => {
                let needle = match moment {
                    Moment::MidFault => "RUNNING storm",
                    _ => "RUNNING forkloop",
                };
                assert!(
                    wait_for_output(&mut victim, needle, READY_WAIT),
                    "{label} ({moment:?}) never reached its storm\n{}\n{}",
                    victim.context(),
                    d.proc.context()
                );
                handed += 1;
                std::thread::sleep(Duration::from_micros(chaos.below(30_000)));
            }
        }
        moments[moment as usize] += 1;
        assert!(
            victim.try_wait().is_none(),
            "{label} ({moment:?}) exited before it was killed\n{}",
            victim.context()
        );
        kill_group(&mut victim);
        assert!(
            !victim.stdout().contains("FAIL"),
            "{label} ({moment:?}) saw wrong memory\n{}",
            victim.context()
        );
        d.assert_alive(&format!("{label} ({moment:?}) was killed"));
        min_served += fresh_target_is_served(&dir, &d, &format!("fresh{i}"));
        handed += 1;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{iterations} kills in {elapsed:.1?} (at spawn, near the handshake, mid-fault, mid-fork-storm: \
         {moments:?})"
    );
    if iterations >= 40 {
        assert!(
            moments.iter().all(|&m| m > 0),
            "the kills did not spread over the moments: {moments:?}"
        );
    }

    // Nothing of the dead targets is left in the daemon: fds, memory, address spaces.
    d.assert_fds_back(&format!("{iterations} killed targets"));
    let rss_end = rss_kib(d.pid());
    const RSS_GROWTH_LIMIT_KIB: u64 = 16 * 1024;
    assert!(
        rss_end <= rss_start + RSS_GROWTH_LIMIT_KIB,
        "the daemon's RSS grew from {rss_start} KiB to {rss_end} KiB over {iterations} killed \
         targets (limit +{RSS_GROWTH_LIMIT_KIB} KiB)"
    );
    assert_no_d_state(&[d.pid()], "the daemon");
    let report = d.stop();
    let ctx = report.pretty();
    // Kills that landed inside a handshake show up as refused ("gone since it sent its uffd")
    // or as protocol errors (disconnected mid-handshake): where they land is up to chance.
    eprintln!(
        "handshakes cut short: {} refused, {} protocol errors",
        report.u64("refused"),
        report.u64("protocol_errors")
    );
    assert_eq!(
        report.u64("spaces_live"),
        0,
        "every address space of the killed targets was let go\n{ctx}"
    );
    assert!(
        report.u64("handoffs") >= handed,
        "handoffs < {handed} (fresh targets and victims that reached their storm)\n{ctx}"
    );
    assert!(
        report.u64("pages_served") >= min_served,
        "pages_served < {min_served} (the fresh targets' min_served)\n{ctx}"
    );
    if moments[Moment::MidForkStorm as usize] > 0 {
        assert!(report.u64("events.fork") >= 1, "{ctx}");
        assert!(report.u64("fork_pages_served") >= 1, "{ctx}");
    }
}

#[test]
fn a_thousand_forked_children_alive_at_once_are_all_served() {
    require_root_and_uffd();
    let dir = TestDir::new("forkmany");
    let exe = target("forkmany");
    let cmd = [exe.to_string_lossy().into_owned(), "1000".to_string()];
    let native = run_native(&dir, "forkmany-native", &cmd, &[], LIMIT).ok_line("forkmany");
    let run = umm_run(&dir, "forkmany", &cmd, &[], LIMIT);
    run.assert_success();
    let ok = run.ok_line("forkmany");
    assert_eq!(ok.checksum(), native.checksum(), "{}", run.context());
    assert_eq!(ok.u64("children"), 1000);
    assert_eq!(ok.u64("alive_at_once"), 1000);
    run.assert_all_registered(&ok);
    run.assert_ge(
        "events.fork",
        1000,
        "every fork of a process with registered memory raises UFFD_EVENT_FORK",
    );
    run.assert_ge(
        "processes",
        1001,
        "the parent and its 1000 children are address spaces umm managed",
    );
    run.assert_ge(
        "fork_pages_served",
        ok.u64("child_min_served"),
        "each child read and wrote 8 pages missing in its own address space: only the manager, \
         holding the child's FORK uffd, can have filled them",
    );
}

#[test]
fn sixty_four_threads_fault_different_pages_at_once() {
    let (_dir, _native, run, ok) =
        native_and_managed("threads64", "threads", &["64", "128"], LIMIT);
    assert_eq!(ok.u64("threads"), 64);
    run.assert_ge("faults", 64, "64 threads first-touched their own slices");
}

#[test]
fn sixty_four_threads_fault_the_same_pages_at_once() {
    let (_dir, _native, run, ok) =
        native_and_managed("samepage64", "samepage", &["64", "40", "32"], LIMIT);
    assert_eq!(ok.u64("threads"), 64);
    assert_eq!(ok.u64("rounds"), 40);
    run.assert_ge(
        "faults",
        40,
        "every round starts with every page zapped: at least one fault per round",
    );
    run.assert_ge(
        "events.remove",
        ok.u64("removes"),
        "each round ends with MADV_DONTNEED of the region",
    );
}

#[test]
fn queued_signals_at_faulting_threads_are_all_handled_and_every_page_is_right() {
    let (_dir, _native, run, ok) =
        native_and_managed("sigstorm", "sigstorm", &["16", "200", "16"], LIMIT);
    // All signals were accounted for by the target itself (handled == sent, per thread);
    // here: both kinds were sent at all.
    assert!(
        ok.u64("sa_restart") > 0 && ok.u64("no_restart") > 0,
        "{:?}",
        ok.fields
    );
    run.assert_ge(
        "events.remove",
        2 * 16 * 200,
        "every round zaps the slice twice",
    );
    run.assert_ge("faults", 16 * 200, "every round faults the zapped slice");
    eprintln!(
        "sigstorm: {} signals, {} EINTR, {} faults",
        ok.u64("signals"),
        ok.u64("eintr"),
        run.counter("faults")
    );
}

#[test]
fn exec_from_a_multithreaded_process_is_served_before_and_after() {
    require_root_and_uffd();
    let dir = TestDir::new("execmt");
    let exe = target("execmt");
    let cmd = [exe.to_string_lossy().into_owned()];
    let run = umm_run(&dir, "execmt", &cmd, &[], LIMIT);
    run.assert_success();
    let ok = run.ok_line("execmt");
    run.assert_all_registered(&ok);
    let phase1: u64 = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("PHASE1 min_served="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no PHASE1 line\n{}", run.context()));
    run.assert_ge(
        "handoffs",
        2,
        "the first image handed its uffd over, and the exec'd image's agent did again",
    );
    run.assert_ge(
        "pages_served",
        phase1 + ok.u64("min_served"),
        "the threads' pages before the exec and the new image's pages after it",
    );
}

/// Wait (bounded) until `pid` is gone (reaped by whoever is its parent now).
fn wait_gone(pid: i32, what: &str, out: impl Fn() -> String) {
    let gone = poll_until(2400, Duration::from_millis(50), || {
        proc_stat(pid).is_none_or(|s| s.0 == 'Z')
    });
    if !gone {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        panic!(
            "{what} (pid {pid}) still runs 120 s after its manager died\n{}",
            out()
        );
    }
}

#[test]
fn sigkill_of_the_daemon_mid_fault_storm_leaves_targets_on_plain_memory() {
    require_root_and_uffd();
    let dir = TestDir::new("daemon-killed");
    let mut d = UmmDaemon::start(&dir);
    let go = dir.join("go");
    let go_s = go.to_str().expect("utf-8 path");
    let mut storms: Vec<Proc> = (0..2)
        .map(|i| {
            Proc::spawn(
                &dir,
                &format!("storm{i}"),
                d.served(target("storm"), &["4", "64", go_s, "20"]),
            )
        })
        .collect();
    let mut forks = Proc::spawn(
        &dir,
        "forkloop",
        d.served(target("forkloop"), &["300", "8"]),
    );
    for p in storms.iter_mut() {
        assert!(
            wait_for_output(p, "RUNNING storm", READY_WAIT),
            "{} never reached its storm\n{}",
            p.label,
            p.context()
        );
    }
    assert!(
        wait_for_output(&mut forks, "RUNNING forkloop", READY_WAIT),
        "forkloop never started forking\n{}",
        forks.context()
    );
    // Mid-storm: the daemon dies without a chance to clean up.
    d.assert_alive("the targets started");
    d.proc.kill();
    std::fs::write(&go, b"").expect("create the go file");
    for p in storms.iter_mut().chain(std::iter::once(&mut forks)) {
        assert_no_d_state(&[p.pid], &p.label);
        let st = p.wait_bounded(Duration::from_secs(120));
        assert!(
            st.success(),
            "{} did not survive its manager's death: {}\n{}",
            p.label,
            describe(&st),
            p.context()
        );
        p.assert_group_gone();
    }
    for p in &storms {
        let ok = OkLine::find(&p.stdout(), "storm")
            .unwrap_or_else(|| panic!("no OK line\n{}", p.context()));
        assert_eq!(
            ok.u64("before"),
            1,
            "{}: the region was registered while the daemon lived: {:?}",
            p.label,
            ok.fields
        );
        assert_eq!(
            ok.u64("after"),
            0,
            "{}: the dead manager's uffd was released, the kernel unregistered the range: {:?}",
            p.label,
            ok.fields
        );
    }
    let ok = OkLine::find(&forks.stdout(), "forkloop")
        .unwrap_or_else(|| panic!("no OK line\n{}", forks.context()));
    assert_eq!(ok.u64("children"), 300, "{:?}", ok.fields);
}

#[test]
fn sigkill_of_umm_run_mid_fault_storm_leaves_the_command_on_plain_memory() {
    require_root_and_uffd();
    let dir = TestDir::new("run-killed");
    let go = dir.join("go");
    let exe = target("storm");
    let cmd = [
        exe.to_string_lossy().into_owned(),
        "4".into(),
        "64".into(),
        go.to_string_lossy().into_owned(),
        "20".into(),
    ];
    let (c, _report) = umm_run_command(&dir, "run-killed", &cmd);
    let mut umm = Proc::spawn(&dir, "run-killed", c);
    assert!(
        wait_for_output(&mut umm, "RUNNING storm", READY_WAIT),
        "the command never reached its storm\n{}",
        umm.context()
    );
    let storm: Vec<i32> = group_members(umm.pid)
        .into_iter()
        .filter(|m| m.0 != umm.pid && m.2 == "storm")
        .map(|m| m.0)
        .collect();
    assert_eq!(storm.len(), 1, "the command's pid: {storm:?}");
    let storm = storm[0];
    // The manager alone (not its group) dies mid-storm.
    umm.signal(Signal::SIGKILL);
    let st = umm.wait_bounded(Duration::from_secs(30));
    assert_eq!(st.code(), None, "umm run was SIGKILLed: {}", describe(&st));
    std::fs::write(&go, b"").expect("create the go file");
    assert_no_d_state(&[storm], "the command after its manager died");
    wait_gone(storm, "the command", || umm.context());
    let out = umm.stdout();
    assert!(!out.contains("FAIL"), "{}", umm.context());
    let ok = OkLine::find(&out, "storm")
        .unwrap_or_else(|| panic!("the command did not finish right\n{}", umm.context()));
    assert_eq!(
        ok.u64("before"),
        1,
        "served while umm lived: {:?}",
        ok.fields
    );
    assert_eq!(
        ok.u64("after"),
        0,
        "plain memory after umm died: {:?}",
        ok.fields
    );
    umm.assert_group_gone();
}

#[test]
fn attach_detach_cycles_leave_the_daemon_flat() {
    require_root_and_uffd();
    let cycles = env_count("UMM_ATTACH_CYCLES", 4000).max(10);
    let dir = TestDir::new("attach-cycles");
    let mut d = UmmDaemon::start(&dir);
    let driver = target("attachloop");
    let agent = agent_lib();
    let sock = d.sock.clone();
    let run_cycles = |d: &mut UmmDaemon, n: usize, label: &str| {
        let mut c = std::process::Command::new(&driver);
        c.arg(n.to_string())
            .arg(&agent)
            .arg(&sock)
            .env_remove("LD_PRELOAD");
        let mut p = Proc::spawn(&dir, label, c);
        let st = p.wait_bounded(Duration::from_secs(1800));
        assert!(
            st.success(),
            "{label}: {}\n{}\n{}",
            describe(&st),
            p.context(),
            d.proc.context()
        );
        p.assert_group_gone();
        let ok = OkLine::find(&p.stdout(), "attachloop")
            .unwrap_or_else(|| panic!("{label}: no OK line\n{}", p.context()));
        assert_eq!(ok.u64("cycles"), n as u64);
        d.assert_fds_back(label);
    };
    let first = cycles / 10;
    let started = Instant::now();
    run_cycles(&mut d, first, "first-tenth");
    let rss_tenth = rss_kib(d.pid());
    run_cycles(&mut d, cycles - first, "the-rest");
    let elapsed = started.elapsed();
    let rss_end = rss_kib(d.pid());
    eprintln!(
        "{cycles} attach/detach cycles in {elapsed:.1?} ({:.2} ms each); daemon RSS {rss_tenth} KiB \
         at 10 %, {rss_end} KiB at 100 %",
        elapsed.as_secs_f64() * 1000.0 / cycles as f64
    );
    const RSS_GROWTH_LIMIT_KIB: u64 = 1024;
    assert!(
        rss_end <= rss_tenth + RSS_GROWTH_LIMIT_KIB,
        "the daemon's RSS grew from {rss_tenth} KiB (10 % of the cycles) to {rss_end} KiB (all \
         {cycles}): more than {RSS_GROWTH_LIMIT_KIB} KiB, not flat"
    );
    assert_no_d_state(&[d.pid()], "the daemon");
    let report = d.stop();
    let ctx = report.pretty();
    assert_eq!(
        report.u64("handoffs"),
        cycles as u64,
        "every cycle handed its process over exactly once\n{ctx}"
    );
    assert_eq!(report.u64("spaces_live"), 0, "{ctx}");
    assert_eq!(report.u64("protocol_errors"), 0, "{ctx}");
    assert_eq!(report.u64("refused"), 0, "{ctx}");
}
