//! `umm lazy-pages` against a restorer doing CRIU's side of `criu restore --lazy-pages`
//! (tests/targets/criu_restorer.c) on the CRIU 4.2 fixture (tests/fixtures/criu-4.2-memtest/).
//!
//! The fixture's pages files (29 MB) are not committed: these tests are #[ignore] and run by
//! `make lazy-pages-test` (part of `make test`), which finds them like `criu-fixture-test`
//! ($UMM_CRIU_FIXTURE, /work/shared/fixtures/, ../shared/fixtures/) and otherwise prints a
//! SKIPPED line, counted as skipped, never as passed. The protocol tests need only the
//! committed metadata and run everywhere.

mod common;

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const PARENT: u32 = 26975;
const CHILD: u32 = 26977;
const MIB: u64 = 1 << 20;

fn committed_fixture() -> PathBuf {
    root().join("tests/fixtures/criu-4.2-memtest")
}

/// The full fixture, with its pages files.
fn full_fixture() -> PathBuf {
    let dir = std::env::var_os("UMM_CRIU_FIXTURE")
        .map(PathBuf::from)
        .expect("UMM_CRIU_FIXTURE is not set: run these tests with `make lazy-pages-test`");
    assert!(
        dir.join("pages-1.img").is_file() && dir.join("pages-2.img").is_file(),
        "UMM_CRIU_FIXTURE={} has no pages-1.img and pages-2.img",
        dir.display()
    );
    dir
}

/// The restorer's TASK argument: the memtest areas (see src/criu/fixture_tests.rs) and the
/// task's lazy VMAs, from the images.
fn task_spec(images: &umm::criu::ImageDir, pid: u32) -> String {
    let (ppid, vma_start, main_len, seed) = match pid {
        PARENT => (0, 0x7f94_f420_0000u64, 16 * MIB, 1),
        _ => (PARENT, 0x7f94_f4e0_0000, 4 * MIB, 2),
    };
    let mem = images.task_memory(pid).expect("task memory");
    let mut vmas: Vec<usize> = mem.lazy_runs.iter().map(|r| r.vma).collect();
    vmas.dedup();
    let vmas: Vec<String> = vmas
        .iter()
        .map(|&v| format!("{:#x}-{:#x}", mem.mm.vmas[v].start, mem.mm.vmas[v].end))
        .collect();
    format!(
        "{pid}:{ppid}:{seed}:{:#x}:{main_len}:{vma_start:#x}:{}:{}",
        vma_start + 4 * MIB,
        4 * MIB,
        vmas.join("/")
    )
}

/// Lazy bytes of `pid` inside the VMAs the restorer reported as mapped.
fn lazy_in_mapped(images: &umm::criu::ImageDir, pid: u32, stdout: &str) -> u64 {
    let mapped: Vec<(u64, u64)> = stdout
        .lines()
        .filter(|l| l.starts_with(&format!("MAPPED pid={pid} ")))
        .map(|l| {
            let f = |k: &str| {
                let v = l.split(&format!("{k}=0x")).nth(1).unwrap();
                u64::from_str_radix(v.split_whitespace().next().unwrap(), 16).unwrap()
            };
            (f("start"), f("end"))
        })
        .collect();
    let mem = images.task_memory(pid).unwrap();
    mem.lazy_runs
        .iter()
        .filter(|r| mapped.iter().any(|&(s, e)| s <= r.start && r.end() <= e))
        .map(|r| r.len)
        .sum()
}

fn lazy_pages_cmd(images: &Path, work: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(umm_bin());
    cmd.arg("lazy-pages")
        .arg("-D")
        .arg(images)
        .arg("-W")
        .arg(work)
        .args(extra)
        .env("RUST_LOG", "info");
    cmd
}

fn wait_for_socket(path: &Path, umm: &mut Proc) {
    let up = poll_until(1000, Duration::from_millis(10), || path.exists());
    assert!(up, "no {} after 10 s\n{}", path.display(), umm.context());
}

/// The summary line of `pid`: (lazy pages, by faults, by the fill).
fn summary(stderr: &str, pid: u32) -> (String, u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&format!("umm: lazy-pages: pid {pid}")))
        .unwrap_or_else(|| panic!("no summary line for pid {pid} in:\n{stderr}"));
    let num = |before: &str| -> u64 {
        let head = line.split(before).next().unwrap();
        head.split_whitespace().last().unwrap().parse().unwrap()
    };
    (
        line.to_string(),
        num(" lazy pages"),
        num(" by faults"),
        num(" by the fill"),
    )
}

/// Run tests/targets/criu_restorer.c (CRIU's side) against the `umm lazy-pages` being started
/// as `umm`, both to their end: (restorer, its status, umm's status, both contexts).
fn run_restorer(
    dir: &TestDir,
    umm: &mut Proc,
    images: &umm::criu::ImageDir,
) -> (Proc, ExitStatus, ExitStatus, String) {
    run_restorer_with(dir, umm, images, &[])
}

/// [`run_restorer`] with restorer options (`--early-fill`).
fn run_restorer_with(
    dir: &TestDir,
    umm: &mut Proc,
    images: &umm::criu::ImageDir,
    options: &[&str],
) -> (Proc, ExitStatus, ExitStatus, String) {
    let sock = dir.join("lazy-pages.socket");
    wait_for_socket(&sock, umm);
    let mut restorer = Command::new(target("criu_restorer"));
    restorer
        .arg(&sock)
        .args(options)
        .arg(task_spec(images, PARENT))
        .arg(task_spec(images, CHILD));
    let mut r = Proc::spawn(dir, "restorer", restorer);
    let st = r.wait_bounded(Duration::from_secs(120));
    let ust = umm.wait_bounded(Duration::from_secs(60));
    let ctx = format!("{}\n{}", r.context(), umm.context());
    (r, st, ust, ctx)
}

/// Task `pid`'s OK line: it saw no wrong page (image data, scratch, zeros after a drop, its
/// grandchild's view).
fn task_ok(out: &str, pid: u32, ctx: &str) -> OkLine {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("OK criu_task pid={pid} ")))
        .unwrap_or_else(|| panic!("no OK line for {pid}\n{ctx}"));
    let ok = OkLine::find(line, "criu_task").unwrap();
    for k in ["main_bad", "scratch_bad", "zero_bad", "grandchild"] {
        assert_eq!(ok.u64(k), 0, "pid {pid}: {k}\n{ctx}");
    }
    ok
}

/// One task's account after a successful restore: its OK line and its summary line.
struct Served {
    ok: OkLine,
    line: String,
    lazy: u64,
    fill: u64,
    /// Lazy pages in the VMAs the task mapped.
    expected: u64,
}

/// Both tasks saw no wrong page and umm completed their restores (every range unregistered
/// before they exited); every lazy page of a mapped VMA was served to them (image data by a
/// fault or the fill, or zeros after the MADV_DONTNEED and the refill).
fn assert_tasks_served(
    images: &umm::criu::ImageDir,
    out: &str,
    umm_stderr: &str,
    ctx: &str,
) -> Vec<Served> {
    [PARENT, CHILD]
        .into_iter()
        .map(|pid| {
            let ok = task_ok(out, pid, ctx);
            assert_eq!(ok.u64("unregistered"), 1, "pid {pid}\n{ctx}");
            let expected = lazy_in_mapped(images, pid, out) / 4096;
            let (line, lazy, faults, fill) = summary(umm_stderr, pid);
            assert!(line.contains("restore complete"), "{line}\n{ctx}");
            assert!(
                faults + fill >= expected,
                "{line}: expected >= {expected}\n{ctx}"
            );
            Served {
                ok,
                line,
                lazy,
                fill,
                expected,
            }
        })
        .collect()
}

/// The report of a restore of both tasks that ended well, with their forks seen.
fn assert_tree_restored(report: &Path) -> Report {
    let rep = Report::load(report).unwrap();
    assert_eq!(rep.u64("restore.handoffs"), 2, "{}", rep.pretty());
    assert_eq!(rep.u64("restore.completed"), 2, "{}", rep.pretty());
    assert_eq!(rep.u64("restore.killed"), 0, "{}", rep.pretty());
    assert!(rep.u64("events.fork") >= 2, "{}", rep.pretty());
    rep
}

/// `umm lazy-pages` options for a remote restore from a page server on `port` of this host,
/// with a fill of ~3 s: faults and the fill compete for the connection, and the tasks fork
/// and drop pages meanwhile.
fn remote_args(port: u16, report: &Path) -> Vec<String> {
    [
        "--page-server",
        "--address",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--report",
        report.to_str().unwrap(),
        "--fill-rate",
        "8000000",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
#[ignore = "needs the CRIU fixture's pages files: make lazy-pages-test"]
fn criu_restorer_tree_is_served_from_the_pages_files() {
    require_root_and_uffd();
    let fixture = full_fixture();
    let images = umm::criu::ImageDir::open(&fixture).unwrap();
    let dir = TestDir::new("lazy-pages-serve");
    let report = dir.join("report.json");
    let mut umm = Proc::spawn(
        &dir,
        "umm",
        lazy_pages_cmd(
            &fixture,
            dir.path(),
            // A fill of ~3 s: the tasks fork and drop pages while it runs, so FORK and
            // REMOVE events are seen (at full speed the fill can finish first).
            &[
                "--report",
                report.to_str().unwrap(),
                "--fill-rate",
                "8000000",
            ],
        ),
    );
    // --early-fill: each task's RSTF waits until the fill made one of its lazy pages resident,
    // so the fill must begin at the handoff (as the issue asks), not at RSTF.
    let (r, st, ust, ctx) = run_restorer_with(&dir, &mut umm, &images, &["--early-fill"]);
    assert_restore_and_umm_succeeded(&st, &ust, &ctx);
    let out = r.stdout();
    let served = assert_tasks_served(&images, &out, &umm.stderr(), &ctx);
    for (pid, t) in [PARENT, CHILD].into_iter().zip(served) {
        assert!(
            out.contains(&format!("EARLY_FILL pid={pid} ")),
            "pid {pid}: no fill before RSTF\n{ctx}"
        );
        let line = &t.line;
        assert_eq!(t.lazy, images.task_memory(pid).unwrap().lazy_bytes() / 4096);
        // The memtest area was mapped.
        assert!(t.expected >= t.ok.u64("main_pages"), "{line}\n{ctx}");
        assert!(t.fill > 0, "the background fill did nothing: {line}\n{ctx}");
    }
    let rep = assert_tree_restored(&report);
    assert!(rep.u64("events.remove") >= 2, "{}", rep.pretty());
    assert!(rep.u64("fork_pages_served") > 0, "{}", rep.pretty());
}

#[test]
#[ignore = "needs the CRIU fixture's pages files: make lazy-pages-test"]
fn killing_umm_lazy_pages_mid_restore_kills_the_restored_tasks() {
    require_root_and_uffd();
    let fixture = full_fixture();
    let images = umm::criu::ImageDir::open(&fixture).unwrap();
    let dir = TestDir::new("lazy-pages-kill");
    // No fill: the pages stay missing until umm dies.
    let mut umm = Proc::spawn(
        &dir,
        "umm",
        lazy_pages_cmd(&fixture, dir.path(), &["--no-background"]),
    );
    let sock = dir.join("lazy-pages.socket");
    wait_for_socket(&sock, &mut umm);
    let mut restorer = Command::new(target("criu_restorer"));
    restorer
        .arg(&sock)
        .arg("--hold")
        .arg(task_spec(&images, PARENT))
        .arg(task_spec(&images, CHILD));
    let mut r = Proc::spawn(&dir, "restorer", restorer);
    let handed = poll_until(3000, Duration::from_millis(10), || {
        r.stdout().matches("HANDED").count() == 2
    });
    assert!(handed, "tasks not handed over\n{}", r.context());
    umm.signal(Signal::SIGKILL);
    umm.wait_bounded(Duration::from_secs(10));
    // The keeper kills both tasks (they sleep for 120 s otherwise).
    let st = r.wait_bounded(Duration::from_secs(60));
    let out = r.stdout();
    assert!(!st.success(), "{}", r.context());
    assert!(
        out.contains("EXIT init child=") && out.contains("signal=9"),
        "the root task was not killed\n{}",
        r.context()
    );
    r.assert_group_gone();
}

/// umm lazy-pages on the committed metadata (no pages files needed for protocol errors).
fn start_on_metadata(dir: &TestDir) -> (Proc, PathBuf) {
    let mut umm = Proc::spawn(
        dir,
        "umm",
        lazy_pages_cmd(&committed_fixture(), dir.path(), &[]),
    );
    let sock = dir.join("lazy-pages.socket");
    wait_for_socket(&sock, &mut umm);
    (umm, sock)
}

fn expect_failure(umm: &mut Proc, what: &str) {
    let st = umm.wait_bounded(Duration::from_secs(30));
    assert!(!st.success(), "{}", umm.context());
    assert!(
        umm.stderr().contains(what),
        "no '{what}' in the errors\n{}",
        umm.context()
    );
}

#[test]
fn garbage_instead_of_a_pid_is_a_clear_error() {
    require_root_and_uffd();
    let dir = TestDir::new("lazy-pages-garbage");
    let (mut umm, sock) = start_on_metadata(&dir);
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&0i32.to_ne_bytes()).unwrap();
    expect_failure(&mut umm, "0 is not a pid");
}

#[test]
fn connection_closed_without_rstf_is_a_clear_error() {
    require_root_and_uffd();
    let dir = TestDir::new("lazy-pages-no-rstf");
    let (mut umm, sock) = start_on_metadata(&dir);
    let mut s = UnixStream::connect(&sock).unwrap();
    // A zombie (no fd), then nothing: criu restore died.
    s.write_all(&(-(CHILD as i32)).to_ne_bytes()).unwrap();
    drop(s);
    expect_failure(&mut umm, "before the restore-finished mark (RSTF)");
}

#[test]
fn unknown_pid_and_non_uffd_fd_are_refused() {
    require_root_and_uffd();
    for (pid, what) in [
        (4242i32, "pid 4242 is not in the images' process tree"),
        (PARENT as i32, "not a userfaultfd"),
    ] {
        let dir = TestDir::new("lazy-pages-bad-fd");
        let (mut umm, sock) = start_on_metadata(&dir);
        let s = UnixStream::connect(&sock).unwrap();
        let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
        umm::sys::socket::send_with_fds_blocking(s.as_fd(), &pid.to_ne_bytes(), &[]).unwrap();
        umm::sys::socket::send_with_fds_blocking(s.as_fd(), b"*", &[pipe_r.as_fd()]).unwrap();
        expect_failure(&mut umm, what);
    }
}

#[test]
fn a_restore_that_finishes_with_only_zombies_exits_cleanly() {
    require_root_and_uffd();
    let dir = TestDir::new("lazy-pages-zombies");
    let (mut umm, sock) = start_on_metadata(&dir);
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&(-(CHILD as i32)).to_ne_bytes()).unwrap();
    s.write_all(&0x5253_5446u32.to_ne_bytes()).unwrap();
    let st = umm.wait_bounded(Duration::from_secs(30));
    assert!(st.success(), "{}", umm.context());
    assert!(umm.stderr().contains("1 zombie(s)"), "{}", umm.context());
}

/// How the fake page server misbehaves.
#[derive(Clone, Copy)]
enum FakeMode {
    /// Every third reply carries about half the pages asked (CRIU's server stops at the end
    /// of one of its buffers; here more often).
    ShortReplies,
    /// The connection is dropped, unanswered, at this request.
    DropAt(u64),
}

/// What the fake page server did: (requests answered, short replies, bytes sent).
type FakeTally = (u64, u64, u64);

/// A page server speaking CRIU's protocol (`umm::criu::page_server`), serving the fixture's
/// lazy pages from its pages files: one connection, then it returns its tally.
fn fake_page_server(
    fixture: PathBuf,
    mode: FakeMode,
) -> (u16, std::thread::JoinHandle<Result<FakeTally, String>>) {
    use std::io::Read;
    use umm::criu::page_server::{Iov, IOV_LEN, PS_IOV_CLOSE, PS_IOV_GET};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || -> Result<FakeTally, String> {
        let images = umm::criu::ImageDir::open(&fixture).map_err(|e| e.to_string())?;
        let mut tasks = Vec::new();
        for pid in [PARENT, CHILD] {
            let mem = images.task_memory(pid).map_err(|e| e.to_string())?;
            let pages = mem.open_pages().map_err(|e| e.to_string())?;
            tasks.push((pid, mem, pages));
        }
        let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
        let (mut n, mut short, mut bytes) = (0u64, 0u64, 0u64);
        loop {
            let mut hdr = [0u8; IOV_LEN];
            s.read_exact(&mut hdr)
                .map_err(|e| format!("reading request {n}: {e}"))?;
            let req = Iov::decode(&hdr);
            // CRIU's C struct has 4 bytes of padding after `cmd` (umm::criu::page_server).
            if hdr[4..8] != [0; 4] {
                return Err(format!("request {n} has non-zero padding: {hdr:02x?}"));
            }
            if req.cmd == PS_IOV_CLOSE {
                s.write_all(&0i32.to_ne_bytes())
                    .map_err(|e| e.to_string())?;
                return Ok((n, short, bytes));
            }
            if req.cmd != PS_IOV_GET {
                return Err(format!("unexpected command {req:?}"));
            }
            if let FakeMode::DropAt(k) = mode {
                if n == k {
                    return Ok((n, short, bytes)); // drops the connection
                }
            }
            let (_, mem, pages) = tasks
                .iter()
                .find(|(pid, _, _)| u64::from(*pid) == req.dst_id)
                .ok_or_else(|| format!("request for an unknown pid: {req:?}"))?;
            let run = mem
                .lazy_runs
                .iter()
                .find(|r| r.start <= req.vaddr && req.vaddr < r.end())
                .ok_or_else(|| format!("request for a page that is not lazy: {req:?}"))?;
            // As CRIU's server: never past the end of the run holding vaddr.
            let mut nr = req.nr_pages.min((run.end() - req.vaddr) / 4096);
            if matches!(mode, FakeMode::ShortReplies) && n % 3 == 2 && nr > 1 {
                nr /= 2;
            }
            if nr < req.nr_pages {
                short += 1;
            }
            let data = pages
                .data(run.pages_offset + (req.vaddr - run.start), nr * 4096)
                .map_err(|e| e.to_string())?;
            s.write_all(&Iov::pages(req.dst_id as u32, req.vaddr, nr).encode())
                .and_then(|_| s.write_all(data))
                .map_err(|e| format!("answering {req:?}: {e}"))?;
            n += 1;
            bytes += nr * 4096;
        }
    });
    (port, handle)
}

/// The restorer (`st`) and `umm lazy-pages` (`ust`) both exited 0.
fn assert_restore_and_umm_succeeded(st: &ExitStatus, ust: &ExitStatus, ctx: &str) {
    assert!(st.success(), "restorer failed: {}\n{ctx}", describe(st));
    assert!(
        ust.success(),
        "umm lazy-pages failed: {}\n{ctx}",
        describe(ust)
    );
}

/// What came over the page server (`fetched` bytes) is at least half of the lazy memory the
/// two tasks mapped (their restorer output `out`): the remote path carried the memory.
fn assert_fetched_half_of_the_lazy_memory(
    images: &umm::criu::ImageDir,
    out: &str,
    fetched: u64,
    ctx: &str,
) {
    let lazy_mapped = lazy_in_mapped(images, PARENT, out) + lazy_in_mapped(images, CHILD, out);
    assert!(
        fetched >= lazy_mapped / 2,
        "{fetched} < {lazy_mapped}/2\n{ctx}"
    );
}

/// umm's `page server ...: N requests, M short replies, P pages fetched, B bytes fetched`
/// line: (N, M, B).
fn page_server_line(stderr: &str) -> (u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.contains("lazy-pages: page server") && l.contains("bytes fetched"))
        .unwrap_or_else(|| panic!("no page server line in:\n{stderr}"));
    let num = |before: &str| -> u64 {
        let head = line.split(before).next().unwrap();
        head.split_whitespace().last().unwrap().parse().unwrap()
    };
    (
        num(" requests"),
        num(" short replies"),
        num(" bytes fetched"),
    )
}

#[test]
#[ignore = "needs the CRIU fixture's pages files: make lazy-pages-test"]
fn criu_restorer_tree_is_served_from_a_page_server() {
    require_root_and_uffd();
    let fixture = full_fixture();
    let images = umm::criu::ImageDir::open(&fixture).unwrap();
    let dir = TestDir::new("lazy-pages-remote");
    let report = dir.join("report.json");
    let (port, server) = fake_page_server(fixture.clone(), FakeMode::ShortReplies);
    let args = remote_args(port, &report);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut umm = Proc::spawn(&dir, "umm", lazy_pages_cmd(&fixture, dir.path(), &args));
    let (r, st, ust, ctx) = run_restorer(&dir, &mut umm, &images);
    assert_restore_and_umm_succeeded(&st, &ust, &ctx);
    let (answered, server_short, server_bytes) = server
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("fake page server: {e}\n{ctx}"));
    let out = r.stdout();
    assert_tasks_served(&images, &out, &umm.stderr(), &ctx);
    // umm's account of the conversation is the server's: every reply read, the short ones
    // completed by further requests (the memory checks above would fail otherwise).
    let (requests, short, fetched) = page_server_line(&umm.stderr());
    assert_eq!(requests, answered, "{ctx}");
    assert_eq!((short, fetched), (server_short, server_bytes), "{ctx}");
    assert!(short > 0, "no short reply was exercised\n{ctx}");
    assert_fetched_half_of_the_lazy_memory(&images, &out, fetched, &ctx);
    let rep = assert_tree_restored(&report);
    // The report carries the same account of the conversation.
    assert_eq!(
        rep.u64("restore.page_server.requests"),
        answered,
        "{}",
        rep.pretty()
    );
    assert_eq!(rep.u64("restore.page_server.short_replies"), server_short);
    assert_eq!(rep.u64("restore.page_server.bytes_fetched"), server_bytes);
    assert_eq!(
        rep.u64("restore.page_server.pages_fetched") * 4096,
        server_bytes,
        "{}",
        rep.pretty()
    );
}

#[test]
#[ignore = "needs the CRIU fixture's pages files: make lazy-pages-test"]
fn a_lost_page_server_connection_stops_the_restored_tree() {
    require_root_and_uffd();
    let fixture = full_fixture();
    let images = umm::criu::ImageDir::open(&fixture).unwrap();
    let dir = TestDir::new("lazy-pages-remote-drop");
    let (port, server) = fake_page_server(fixture.clone(), FakeMode::DropAt(5));
    let port = port.to_string();
    let mut umm = Proc::spawn(
        &dir,
        "umm",
        lazy_pages_cmd(&fixture, dir.path(), &["--page-server", "--port", &port]),
    );
    let (mut r, st, ust, ctx) = run_restorer(&dir, &mut umm, &images);
    let answered = server.join().unwrap().unwrap();
    assert_eq!(answered.0, 5, "{ctx}");
    // Fail-stop: umm stops the tree (its 20 MiB cannot have arrived in 5 replies), and says
    // why; no task finishes its checks with zeros instead of its data.
    assert!(!ust.success(), "{ctx}");
    let err = umm.stderr();
    assert!(
        err.contains("STOPPED") && err.contains("page server 127.0.0.1:"),
        "{ctx}"
    );
    assert!(!st.success(), "{ctx}");
    // The restorer's pid 1 reports the root task's death, maybe just after the restorer
    // itself failed (if the tree died before the handoff ended).
    let killed = format!("EXIT init child={PARENT} signal=9");
    let seen = poll_until(100, Duration::from_millis(100), || {
        r.stdout().contains(&killed)
    });
    assert!(seen, "the root task was not killed\n{ctx}\n{}", r.stdout());
    assert!(!r.stdout().contains("OK criu_task"), "{ctx}");
    r.assert_group_gone();
}

/// `umm criu-page-server -D FIXTURE --port P` (RUST_LOG=info), running once it said so.
fn criu_page_server(dir: &TestDir, fixture: &Path) -> (Proc, u16) {
    // A free port: bound, read, released (the server binds it right after).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(umm_bin());
    cmd.arg("criu-page-server")
        .arg("-D")
        .arg(fixture)
        .args(["--port", &port.to_string()])
        .env("RUST_LOG", "info");
    let mut server = Proc::spawn(dir, "criu-page-server", cmd);
    let up = poll_until(500, Duration::from_millis(10), || {
        server.stderr().contains("serving ")
    });
    assert!(up, "criu-page-server did not start\n{}", server.context());
    assert!(server.try_wait().is_none(), "{}", server.context());
    (server, port)
}

/// The server's summary: (requests, short replies, pages).
fn criu_page_server_line(stderr: &str) -> (u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("umm: criu-page-server: ") && l.contains(" served in "))
        .unwrap_or_else(|| panic!("no summary line in:\n{stderr}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let before = |w: &str| -> u64 {
        let i = words.iter().position(|x| x.starts_with(w)).unwrap();
        words[i - 1].trim_start_matches('(').parse().unwrap()
    };
    (before("requests"), before("short)"), before("pages"))
}

#[test]
#[ignore = "needs the CRIU fixture's pages files: make lazy-pages-test"]
fn umm_criu_page_server_serves_umm_lazy_pages_remote() {
    require_root_and_uffd();
    let fixture = full_fixture();
    let images = umm::criu::ImageDir::open(&fixture).unwrap();
    let dir = TestDir::new("criu-page-server");
    let (mut server, port) = criu_page_server(&dir, &fixture);
    let report = dir.join("report.json");
    let args = remote_args(port, &report);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut umm = Proc::spawn(&dir, "umm", lazy_pages_cmd(&fixture, dir.path(), &args));
    let (r, st, ust, ctx) = run_restorer(&dir, &mut umm, &images);
    let sst = server.wait_bounded(Duration::from_secs(30));
    let ctx = format!("{ctx}\n{}", server.context());
    assert_restore_and_umm_succeeded(&st, &ust, &ctx);
    // PS_IOV_CLOSE ended the server, cleanly.
    assert!(sst.success(), "criu-page-server: {}\n{ctx}", describe(&sst));
    let out = r.stdout();
    assert_tasks_served(&images, &out, &umm.stderr(), &ctx);
    // Both sides count the same conversation, and it carried the tasks' memory.
    let (requests, short, fetched) = page_server_line(&umm.stderr());
    let (answered, server_short, pages) = criu_page_server_line(&server.stderr());
    assert_eq!((requests, short), (answered, server_short), "{ctx}");
    assert_eq!(fetched, pages * 4096, "{ctx}");
    assert_fetched_half_of_the_lazy_memory(&images, &out, fetched, &ctx);
    let rep = assert_tree_restored(&report);
    assert_eq!(rep.u64("restore.page_server.bytes_fetched"), fetched);
}

#[test]
#[ignore = "needs the CRIU fixture's pages files: make lazy-pages-test"]
fn umm_criu_page_server_answers_only_lazy_pages() {
    use std::io::Read;
    use umm::criu::page_server::{Iov, IOV_LEN};
    let fixture = full_fixture();
    let images = umm::criu::ImageDir::open(&fixture).unwrap();
    let mem = images.task_memory(PARENT).unwrap();
    let pages = mem.open_pages().unwrap();
    let dir = TestDir::new("criu-page-server-bad");
    let (mut server, port) = criu_page_server(&dir, &fixture);
    let connect = || std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let closed_after = |req: Iov| {
        let mut c = connect();
        c.write_all(&req.encode()).unwrap();
        let mut b = [0u8; 1];
        matches!(c.read(&mut b), Ok(0) | Err(_))
    };
    // An unknown pid, an address outside the lazy pages, zero pages: the connection is closed
    // unanswered, the server goes on.
    assert!(closed_after(Iov::get(999, mem.lazy_runs[0].start, 1)));
    assert!(closed_after(Iov::get(PARENT, 0x1000, 1)));
    assert!(closed_after(Iov::get(PARENT, mem.lazy_runs[0].start, 0)));
    let err = server.stderr();
    assert!(err.contains("no task with pid 999"), "{}", server.context());
    assert!(
        err.contains("no lazy page at 0x1000"),
        "{}",
        server.context()
    );
    // A request past the end of a run gets the run's rest (a short reply) with its bytes.
    let run = mem.lazy_runs[0];
    let at = run.end() - 2 * 4096;
    let mut c = connect();
    c.write_all(&Iov::get(PARENT, at, 64).encode()).unwrap();
    let mut hdr = [0u8; IOV_LEN];
    c.read_exact(&mut hdr).unwrap();
    let reply = Iov::decode(&hdr);
    assert_eq!(reply.check_reply_to(&Iov::get(PARENT, at, 64)), Ok(2));
    let mut data = vec![0u8; 2 * 4096];
    c.read_exact(&mut data).unwrap();
    let want = pages
        .data(run.pages_offset + (at - run.start), 2 * 4096)
        .unwrap();
    assert!(data == want, "the reply's pages are not the image's");
    c.write_all(&Iov::close().encode()).unwrap();
    let mut status = [0u8; 4];
    c.read_exact(&mut status).unwrap();
    assert_eq!(i32::from_ne_bytes(status), 0);
    drop(c);
    let st = server.wait_bounded(Duration::from_secs(10));
    assert!(st.success(), "{}", server.context());
    assert_eq!(criu_page_server_line(&server.stderr()), (4, 1, 2));
}
