//! `umm daemon`: targets opt in with LD_PRELOAD + UMM_SOCKET; bad peers are dropped, and
//! everyone else keeps being served.
//!
//! Targets run with `UMM_REQUIRE=1` (the agent exits 1 if it is not managed), so a target's exit
//! 0 plus `registered=N/N` in its OK line proves the daemon took it over. After every bad peer
//! the daemon's fd count must come back to its baseline (polled a bounded number of times:
//! closing is asynchronous, speed is not what is tested), and a fresh target must be served.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

use common::wire::*;
use common::*;

const LIMIT: Duration = Duration::from_secs(180);
/// How long a bad peer may stay connected before we call it "not dropped" (bounded wait).
const DROP_WAIT: Duration = Duration::from_secs(20);

/// Run a served target to completion; it must exit 0 and print its OK line with every checked
/// region registered. Returns its OK line.
fn run_served(dir: &TestDir, d: &UmmDaemon, label: &str, name: &str, args: &[&str]) -> OkLine {
    let mut p = Proc::spawn(dir, label, d.served(target(name), args));
    finish_served(&mut p, name)
}

fn finish_served(p: &mut Proc, name: &str) -> OkLine {
    let st = p.wait_bounded(LIMIT);
    assert!(
        st.success(),
        "served target {} ({name}): {} (UMM_REQUIRE=1: exit 1 = not managed)\n{}",
        p.label,
        describe(&st),
        p.context()
    );
    p.assert_group_gone();
    let ok = OkLine::find(&p.stdout(), name)
        .unwrap_or_else(|| panic!("no OK line from {}\n{}", p.label, p.context()));
    let (k, n) = ok.registered();
    assert!(
        n > 0 && k == n,
        "{}: {k}/{n} regions registered\n{}",
        p.label,
        p.context()
    );
    ok
}

/// Read what the daemon answers a bad peer until it drops the connection. Any answer must be a
/// Nack frame; the connection must be closed within DROP_WAIT.
fn expect_dropped(s: UnixStream, what: &str) {
    let got = read_until_closed(s, what);
    if got.len() >= 8 {
        let kind = u16::from_le_bytes([got[6], got[7]]);
        assert_eq!(
            kind, KIND_NACK,
            "{what}: the daemon answered with kind {kind:#06x}, not a Nack: {got:02x?}"
        );
    }
}

#[test]
fn daemon_serves_unrelated_targets_and_survives_bad_peers() {
    require_root_and_uffd();
    let dir = TestDir::new("daemon");
    let mut d = UmmDaemon::start(&dir);
    let mut min_served = 0;
    let mut targets = 0u64; // programs that handed a uffd over
    let mut processes = 0u64;

    // two unrelated targets at once
    let mut a = Proc::spawn(&dir, "threads", d.served(target("threads"), &["16", "64"]));
    let mut b = Proc::spawn(
        &dir,
        "forkstorm",
        d.served(target("forkstorm"), &["32", "8"]),
    );
    let ok_a = finish_served(&mut a, "threads");
    let ok_b = finish_served(&mut b, "forkstorm");
    min_served += ok_a.u64("min_served") + ok_b.u64("min_served");
    let forks = ok_b.u64("children") + ok_b.u64("grandchildren");
    targets += 2;
    processes += 2 + forks;
    d.assert_fds_back("two targets at once");

    let fresh = |d: &mut UmmDaemon, after: &str| {
        d.assert_fds_back(after);
        let ok = run_served(
            &dir,
            d,
            &format!("fresh-after-{}", after.replace(' ', "-")),
            "registered",
            &[],
        );
        d.assert_fds_back(&format!("the fresh target after {after}"));
        ok.u64("min_served")
    };

    // 1. garbage bytes (the first four read as an absurd frame length)
    let mut s = d.connect(DROP_WAIT);
    s.write_all(b"\xde\xad\xbe\xefthis is not a umm frame at all \x00\x01\x02\xff")
        .expect("write garbage");
    expect_dropped(s, "garbage bytes");
    min_served += fresh(&mut d, "garbage");

    // 2. a well-formed Hello with a wrong protocol version
    let mut s = d.connect(DROP_WAIT);
    let f = frame(
        0x7777,
        KIND_HELLO,
        &hello(std::process::id(), HELLO_WANT_GRANT, "/bin/bad-version"),
    );
    s.write_all(&f).expect("write frame");
    expect_dropped(s, "wrong protocol version");
    min_served += fresh(&mut d, "wrong version");

    // 3. Hello claiming an attached uffd, with a pipe attached instead
    let s = d.connect(DROP_WAIT);
    let (pr, _pw) = nix::unistd::pipe().expect("pipe");
    let f = frame(
        VERSION,
        KIND_HELLO,
        &hello(std::process::id(), HELLO_HAS_UFFD, "/bin/not-a-uffd"),
    );
    let fds = [pr.as_raw_fd()];
    let iov = [std::io::IoSlice::new(&f)];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let n =
        sendmsg::<UnixAddr>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).expect("sendmsg");
    assert_eq!(n, f.len());
    drop(pr); // our copy; the daemon must close its own
    expect_dropped(s, "a pipe passed off as a userfaultfd");
    min_served += fresh(&mut d, "non-uffd fd");

    // 4. a peer that disconnects in the middle of a frame
    let mut s = d.connect(DROP_WAIT);
    let f = frame(
        VERSION,
        KIND_HELLO,
        &hello(std::process::id(), HELLO_WANT_GRANT, "/bin/half-a-frame"),
    );
    s.write_all(&f[..f.len() / 2]).expect("write half a frame");
    drop(s);
    min_served += fresh(&mut d, "mid-frame disconnect");
    let bad_peers = 4;

    // 5. a target SIGKILLed while its threads are faulting
    let mut k = Proc::spawn(
        &dir,
        "samepage-killed",
        d.served(target("samepage"), &["32", "0", "64"]),
    );
    let running = poll_until(1200, Duration::from_millis(50), || {
        k.stdout().contains("RUNNING samepage") || k.try_wait().is_some()
    });
    assert!(
        running && k.try_wait().is_none(),
        "samepage never reported RUNNING under the daemon\n{}",
        k.context()
    );
    std::thread::sleep(Duration::from_millis(300)); // let it fault a few more rounds
    k.kill();
    k.assert_group_gone();
    targets += 1;
    processes += 1;
    min_served += fresh(&mut d, "a target SIGKILLed while faulting");
    targets += 5;
    processes += 5;

    let report = d.stop();
    let ctx = report.pretty();
    let bad = report.u64("refused") + report.u64("protocol_errors");
    assert!(
        bad >= bad_peers,
        "refused + protocol_errors = {bad}, want >= {bad_peers} (garbage, wrong version, non-uffd fd, \
         mid-frame disconnect)\n{ctx}"
    );
    assert!(
        report.u64("handoffs") >= targets,
        "handoffs < {targets}\n{ctx}"
    );
    assert!(
        report.u64("processes") >= processes,
        "processes < {processes}\n{ctx}"
    );
    assert!(
        report.u64("events.fork") >= forks,
        "events.fork < {forks}\n{ctx}"
    );
    assert!(
        report.u64("pages_served") >= min_served,
        "pages_served < {min_served} (the served targets' min_served)\n{ctx}"
    );
    assert!(report.u64("faults") >= 1, "{ctx}");
    assert_eq!(
        report.u64("spaces_live"),
        0,
        "every target had exited before SIGTERM\n{ctx}"
    );
}

#[test]
fn daemon_exits_zero_on_sigterm_when_idle() {
    require_root_and_uffd();
    let dir = TestDir::new("daemon-idle");
    let d = UmmDaemon::start(&dir);
    let report = d.stop();
    let ctx = report.pretty();
    assert_eq!(report.u64("handoffs"), 0, "{ctx}");
    assert_eq!(report.u64("spaces_live"), 0, "{ctx}");
    assert_eq!(report.u64("pages_served"), 0, "{ctx}");
}

#[test]
fn daemon_stopping_leaves_running_targets_on_plain_memory() {
    // Track mode fails open: SIGTERM closes every uffd, the kernel unregisters the ranges, and
    // a target that was being served goes on with its data intact.
    require_root_and_uffd();
    let dir = TestDir::new("daemon-outlive");
    let d = UmmDaemon::start(&dir);
    let go = dir.join("go");
    let mut t = Proc::spawn(
        &dir,
        "outlive",
        d.served(target("outlive"), &[go.to_str().expect("utf-8 path")]),
    );
    let phase1 = poll_until(1200, Duration::from_millis(50), || {
        t.stdout().contains("PHASE1") || t.try_wait().is_some()
    });
    assert!(phase1, "outlive never reached phase 1\n{}", t.context());
    assert!(
        t.stdout().contains("PHASE1 registered=1"),
        "phase 1 memory was not registered\n{}",
        t.context()
    );
    let report = d.stop();
    std::fs::write(&go, b"").expect("create the go file");
    let status = t.wait_bounded(Duration::from_secs(120));
    assert!(
        status.success(),
        "the target did not survive its manager\n{}",
        t.context()
    );
    let ok = OkLine::find(&t.stdout(), "outlive")
        .unwrap_or_else(|| panic!("no OK line\n{}", t.context()));
    assert_eq!(ok.u64("before"), 1, "{:?}", ok.fields);
    assert_eq!(
        ok.u64("after"),
        0,
        "after the manager stopped, the kernel unregistered the range: {:?}",
        ok.fields
    );
    let ctx = report.pretty();
    assert_eq!(report.u64("handoffs"), 1, "{ctx}");
    assert_eq!(
        report.u64("spaces_live"),
        1,
        "the target was alive at SIGTERM\n{ctx}"
    );
    // phase 1 wrote the first 1 MiB (256 pages) of a fresh registered region
    assert!(
        report.u64("pages_served") >= 256,
        "phase 1 was served\n{ctx}"
    );
}
