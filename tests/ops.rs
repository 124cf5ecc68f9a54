//! Operability: `umm --version` probes the kernel without privileges, completions load in
//! bash, the systemd units verify, `umm daemon` serves a socket passed by socket activation
//! (and leaves it alone), and the typical mistakes get one clear line.

mod common;

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::process::{Command, Output};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::Signal;

use common::*;

const NOBODY: &str = "65534";

fn output(mut cmd: Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn as_nobody(exe: &std::path::Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .arg(exe);
    c
}

/// The value of a `name: value` line of `umm --version`.
fn version_line<'a>(stdout: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name}: ");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no `{name}:` line in\n{stdout}"))
}

#[test]
fn version_reports_the_kernel_features_with_and_without_privileges() {
    require_root_and_uffd();
    let root = output({
        let mut c = Command::new(umm_bin());
        c.arg("--version");
        c
    });
    assert!(root.status.success(), "{}", text(&root));
    let stdout = String::from_utf8_lossy(&root.stdout).into_owned();
    assert!(
        stdout.starts_with(&format!("umm {}\n", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    // The features are what this kernel really offers, as the library's own probe finds.
    let truth = umm::uffd::Uffd::probe_features().expect("probe as root");
    let features = version_line(&stdout, "uffd features");
    assert!(
        features.starts_with(&format!("{:#x} ", truth.available.bits())),
        "{features} vs {:#x}",
        truth.available.bits()
    );
    assert!(version_line(&stdout, "uffd range ioctls").contains("COPY"));
    assert!(version_line(&stdout, "EVENT_FORK for this process").starts_with("yes"));
    let sysctl = fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap();
    assert!(version_line(&stdout, "vm.unprivileged_userfaultfd").starts_with(sysctl.trim()));
    assert!(version_line(&stdout, "/dev/userfaultfd").contains("this user can open it"));

    // Without privileges it still prints, the same kernel facts, and says what it lacks.
    let nobody = output({
        let mut c = as_nobody(&umm_bin());
        c.arg("--version");
        c
    });
    assert!(nobody.status.success(), "{}", text(&nobody));
    let plain = String::from_utf8_lossy(&nobody.stdout).into_owned();
    assert_eq!(version_line(&plain, "uffd features"), features, "{plain}");
    assert_eq!(
        version_line(&plain, "uffd range ioctls"),
        version_line(&stdout, "uffd range ioctls")
    );
    assert!(
        version_line(&plain, "EVENT_FORK for this process").contains("needs CAP_SYS_PTRACE"),
        "{plain}"
    );
    if sysctl.trim() == "0" {
        assert!(
            version_line(&plain, "userfaultfd for this user").starts_with("user-mode-only"),
            "{plain}"
        );
        assert!(version_line(&plain, "/dev/userfaultfd").contains("cannot open it"));
    }
}

#[test]
fn bash_completion_loads_and_completes_subcommands() {
    let script = format!(
        "source <('{}' completions bash) && complete -p umm && \
         COMP_WORDS=(umm da); COMP_CWORD=1; _umm umm da umm; echo \"words: ${{COMPREPLY[*]}}\"",
        umm_bin().display()
    );
    let out = output({
        let mut c = Command::new("bash");
        c.args(["-c", &script]);
        c
    });
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("complete -"), "{}", text(&out));
    assert!(stdout.contains("-F _umm umm"), "{}", text(&out));
    assert!(stdout.contains("words: daemon"), "{}", text(&out));
    for shell in ["zsh", "fish"] {
        let out = output({
            let mut c = Command::new(umm_bin());
            c.args(["completions", shell]);
            c
        });
        assert!(
            out.status.success() && out.stdout.len() > 100,
            "{}",
            text(&out)
        );
    }
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let dir = TestDir::new("ops-units");
    let dist = root().join("dist");
    // verify wants the ExecStart binary to exist: point the unit at this build's umm.
    let service = fs::read_to_string(dist.join("umm.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/local/bin/umm daemon"));
    let service = service.replace("/usr/local/bin/umm", &umm_bin().display().to_string());
    fs::write(dir.join("umm.service"), service).unwrap();
    fs::copy(dist.join("umm.socket"), dir.join("umm.socket")).unwrap();
    let out = output({
        // --man=no: the pages are not installed here; man:umm(1) is checked by make install.
        let mut c = Command::new("systemd-analyze");
        c.args(["verify", "--man=no"])
            .arg(dir.join("umm.service"))
            .arg(dir.join("umm.socket"));
        c
    });
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );
}

#[test]
fn socket_activated_daemon_serves_the_passed_socket_and_leaves_it_alone() {
    require_root_and_uffd();
    let dir = TestDir::new("ops-activation");
    let sock = dir.join("activated.sock");
    let report = dir.join("report.json");
    let listener = UnixListener::bind(&sock).expect("bind");
    // A mode umm's own bind would never pick (it makes sockets 0600): it must survive.
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o640)).unwrap();
    // Inherited across exec like systemd passes it; the shell moves it to fd 3.
    fcntl(listener.as_fd(), FcntlArg::F_SETFD(FdFlag::empty())).expect("clear CLOEXEC");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    // (The listener may already be fd 3 when this test runs alone.)
    let move_to_3 = if fd == 3 {
        String::new()
    } else {
        format!("exec 3<&{fd} {fd}<&-;")
    };
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "{move_to_3} LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" daemon \
             --socket \"$1\" --report \"$2\""
        ))
        .arg(umm_bin())
        // --socket names a path that must stay untouched: the passed socket wins.
        .arg(dir.join("never-created.sock"))
        .arg(&report)
        .env("RUST_LOG", "info");
    let mut daemon = Proc::spawn(&dir, "daemon", cmd);
    drop(listener);

    // The agent connects to the passed socket; UMM_REQUIRE=1 makes it exit 1 if unserved.
    let mut t = Command::new(target("threads"));
    t.env("LD_PRELOAD", agent_lib())
        .env("UMM_SOCKET", &sock)
        .env("UMM_REQUIRE", "1");
    let mut served = Proc::spawn(&dir, "threads", t);
    let st = served.wait_bounded(Duration::from_secs(120));
    assert!(
        st.success(),
        "target via the activated socket: {}\n{}\n{}",
        describe(&st),
        served.context(),
        daemon.context()
    );
    let ok = OkLine::find(&served.stdout(), "threads")
        .unwrap_or_else(|| panic!("no OK line\n{}", served.context()));
    let (k, n) = ok.registered();
    assert!(n > 0 && k == n, "{k}/{n} registered\n{}", served.context());

    daemon.signal(Signal::SIGTERM);
    let st = daemon.wait_bounded(Duration::from_secs(60));
    assert!(
        st.success(),
        "daemon: {}\n{}",
        describe(&st),
        daemon.context()
    );
    assert!(
        daemon.stderr().contains("socket activation: listening on"),
        "{}",
        daemon.context()
    );
    let rep = Report::load(&report).unwrap_or_else(|e| panic!("{e}\n{}", daemon.context()));
    rep.check_shape();
    assert!(rep.u64("handoffs") >= 1, "{}", rep.pretty());
    assert!(rep.u64("pages_served") > 0, "{}", rep.pretty());
    // The service manager's socket: not removed, not chmod'ed; --socket never bound.
    let meta = fs::symlink_metadata(&sock).expect("the passed socket was removed");
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    assert!(!dir.join("never-created.sock").exists());
}

#[test]
fn daemon_on_a_socket_in_use_says_so_in_one_line() {
    require_root_and_uffd();
    let dir = TestDir::new("ops-in-use");
    let sock = dir.join("busy.sock");
    let _busy = UnixListener::bind(&sock).expect("bind");
    let out = output({
        let mut c = Command::new(umm_bin());
        c.arg("daemon").arg("--socket").arg(&sock);
        c
    });
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{}", text(&out));
    assert!(stderr.contains(&sock.display().to_string()), "{stderr}");
    assert!(
        stderr.contains("in use") && stderr.contains("--socket"),
        "{stderr}"
    );
    assert!(sock.exists(), "a live socket must not be replaced");
}

#[test]
fn restore_of_a_missing_image_names_it_and_what_to_give() {
    require_root_and_uffd();
    let dir = TestDir::new("ops-no-image");
    let missing = dir.join("no-such-image");
    let out = output({
        let mut c = Command::new(umm_bin());
        c.arg("restore")
            .arg("--image")
            .arg(&missing)
            .arg("--socket")
            .arg(dir.join("r.sock"));
        c
    });
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{}", text(&out));
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(stderr.contains("umm snapshot"), "{stderr}");
}

#[test]
fn unprivileged_run_and_daemon_say_they_need_root() {
    require_root_and_uffd();
    let dir = TestDir::new("ops-unprivileged");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    let sysctl = fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap();
    for args in [
        vec!["run", "--", "/bin/true"],
        vec![
            "daemon",
            "--socket",
            &dir.join("u/s.sock").display().to_string(),
        ],
    ]
    .iter()
    {
        let out = output({
            let mut c = as_nobody(&umm_bin());
            c.args(args.iter());
            c
        });
        assert_eq!(out.status.code(), Some(1), "umm {args:?}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "umm {args:?}: {}", text(&out));
        assert!(
            stderr.contains("uid 65534") && stderr.contains("run umm as root"),
            "umm {args:?}: {stderr}"
        );
        // Which of the two checks refuses depends on the sysctl; both name the capability.
        if sysctl.trim() == "0" {
            assert!(stderr.contains("may not open a userfaultfd"), "{stderr}");
        }
        assert!(stderr.contains("CAP_SYS_PTRACE"), "{stderr}");
    }
    assert!(
        !dir.join("u").exists(),
        "nothing is created before the check"
    );
}

#[test]
fn socket_activation_with_no_socket_at_fd_3_is_refused_in_one_line() {
    require_root_and_uffd();
    let dir = TestDir::new("ops-bad-activation");
    for (setup, want) in [
        (
            "exec 3</dev/null; LISTEN_FDS=1",
            "fd 3 is not a listening unix socket",
        ),
        ("LISTEN_FDS=0", "passes no socket"),
    ] {
        let out = output({
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!(
                    "{setup} LISTEN_PID=$$ exec \"$0\" daemon --socket \"$1\""
                ))
                .arg(umm_bin())
                .arg(dir.join("unused.sock"));
            c
        });
        assert_eq!(out.status.code(), Some(1), "{setup}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{setup}: {}", text(&out));
        assert!(stderr.contains(want), "{setup}: {stderr}");
        assert!(
            !dir.join("unused.sock").exists(),
            "{setup}: fell back to --socket"
        );
    }
}
