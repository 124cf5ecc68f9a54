//! Post-copy over the network (issue 9): `umm page-server` in one network namespace, `umm
//! restore --source tcp://` with the reference restorer (`richstate restore`,
//! tests/targets/richstate.c) in another, joined by a veth pair with `tc netem` delay (and a
//! rate limit). The restorer verifies every page in random order while it forks, mremaps,
//! MADV_DONTNEEDs and munmaps; the report shows what came over the network.
//!
//! Latency: `tc qdisc netem delay` on both ends of the veth where the kernel has netem; this
//! machine's kernel is built without it (CONFIG_NET_SCH_NETEM unset, no modules), so there the
//! delay comes from a relay in the server's namespace (tests/targets/delay_relay.py: every
//! byte forwarded DELAY later, each direction) and the rate limit from `tbf` on both ends. The
//! test says which it used on stderr.
//!
//! The namespaces and the veth are named after this test process and a counter, and deleted
//! when the guard drops (on panic too). Processes are entered into a namespace with `nsenter
//! --net` (network only: `ip netns exec` would remount /sys and hide the cgroup hierarchy the
//! restore uses). Every process is its own process group, killed by id at the end. Waits are
//! bounded; nothing is asserted about time.

mod common;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::netns::{ip, Veth};
use common::*;
use serde_json::Value;

const SEED: &str = "0x5eed";
const LIMIT: Duration = Duration::from_secs(120);
const SERVER_IP: &str = "10.199.0.1";
const CLIENT_IP: &str = "10.199.0.2";
const PORT: u16 = 7411;

fn richstate() -> PathBuf {
    target("richstate")
}

/// Two network namespaces joined by a veth pair, with a one-way delay and optionally a rate
/// limit in each direction. Deleted on drop.
struct NetPair {
    veth: Veth,
    /// No netem in this kernel: the delay is the relay's (milliseconds), else None.
    relay_delay_ms: Option<u32>,
}

impl NetPair {
    /// `delay_ms` each way; `rate` (e.g. `200mbit`) each way if given.
    fn new(delay_ms: u32, rate: Option<&str>) -> NetPair {
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let cidrs = (format!("{SERVER_IP}/24"), format!("{CLIENT_IP}/24"));
        let set_up = Veth::new(&tag, (&cidrs.0, &cidrs.1)).and_then(|veth| {
            let mut pair = NetPair {
                veth,
                relay_delay_ms: None,
            };
            pair.shape(delay_ms, rate)?;
            Ok(pair)
        });
        set_up.unwrap_or_else(|e| {
            panic!(
                "cannot set up two network namespaces joined by a veth pair with a delay (needs \
                 root, iproute2 and tc; `make test-deps` installs iproute2): {e}"
            )
        })
    }

    /// The delay and the rate on both ends: netem, or (no netem here) the relay and tbf.
    fn shape(&mut self, delay_ms: u32, rate: Option<&str>) -> Result<(), String> {
        for (ns, dev) in self.veth.ends() {
            let tc = [
                "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
            ];
            let delay = format!("{delay_ms}ms");
            let mut netem = tc.to_vec();
            netem.extend(["netem", "delay", &delay]);
            if let Some(r) = rate {
                netem.extend(["rate", r]);
            }
            match ip(&netem) {
                Ok(()) => {}
                Err(e) if e.contains("qdisc kind is unknown") => {
                    // No netem in this kernel: the relay delays, tbf limits the rate.
                    self.relay_delay_ms = Some(delay_ms);
                    if let Some(r) = rate {
                        let mut tbf = tc.to_vec();
                        tbf.extend(["tbf", "rate", r, "burst", "64kb", "latency", "1s"]);
                        ip(&tbf)?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        eprintln!(
            "net: veth between {} and {}: {delay_ms} ms each way by {}{}",
            self.veth.server_ns,
            self.veth.client_ns,
            if self.relay_delay_ms.is_some() {
                "delay_relay.py (this kernel has no netem)"
            } else {
                "netem"
            },
            rate.map(|r| format!(", {r} each way")).unwrap_or_default()
        );
        Ok(())
    }

    /// Where `umm page-server` listens: the veth address, or (relay) the server namespace's
    /// loopback, the relay listening on the veth address.
    fn server_listen(&self) -> String {
        match self.relay_delay_ms {
            None => format!("{SERVER_IP}:{PORT}"),
            Some(_) => format!("127.0.0.1:{}", PORT + 1),
        }
    }

    /// The delay relay, if this kernel needs one (started, ready).
    fn start_relay(&self, dir: &TestDir) -> Option<Proc> {
        let delay = self.relay_delay_ms?;
        let argv: Vec<OsString> = vec![
            PYTHON.into(),
            target_source("delay_relay.py").into(),
            SERVER_IP.into(),
            PORT.to_string().into(),
            "127.0.0.1".into(),
            (PORT + 1).to_string().into(),
            delay.to_string().into(),
        ];
        let mut relay = Proc::spawn(dir, "relay", NetPair::command(&self.veth.server_ns, &argv));
        let up = poll_until(1000, Duration::from_millis(10), || {
            relay.stdout().contains("RELAY READY") || relay.try_wait().is_some()
        });
        assert!(
            up && relay.try_wait().is_none(),
            "the delay relay did not start\n{}",
            relay.context()
        );
        Some(relay)
    }

    /// `cmd` run in `ns` (network namespace only).
    fn command(ns: &str, argv: &[OsString]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}")).arg("--").args(argv);
        c
    }
}

/// An image of `richstate build SEED` (its four regions), and the builder's data pages.
fn build_image(dir: &TestDir) -> (PathBuf, u64) {
    let img = dir.join("img");
    let data_pages = snapshot_richstate(dir, SEED, &img);
    (img, data_pages)
}

fn write_key(dir: &TestDir, name: &str, key: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("{key}\n")).expect("write key");
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod key");
    path
}

const KEY: &str = "a pre-shared key for the tests of umm page-server";

/// `umm page-server` in the server namespace, listening once it said so.
fn start_server(dir: &TestDir, net: &NetPair, img: &Path, env: &[(&str, &str)]) -> Proc {
    start_server_with(dir, net, img, env, &[])
}

/// [`start_server`] with more options (`extra`, e.g. --tls-cert/--tls-key).
fn start_server_with(
    dir: &TestDir,
    net: &NetPair,
    img: &Path,
    env: &[(&str, &str)],
    extra: &[OsString],
) -> Proc {
    let listen = net.server_listen();
    let key = write_key(dir, "server.key", KEY);
    let mut argv: Vec<OsString> = vec![
        umm_bin().into(),
        "page-server".into(),
        "--image".into(),
        img.into(),
        "--listen".into(),
        listen.into(),
        "--key".into(),
        key.into(),
    ];
    argv.extend(extra.iter().cloned());
    let mut c = NetPair::command(&net.veth.server_ns, &argv);
    c.envs(env.iter().copied());
    let mut server = Proc::spawn(dir, "page-server", c);
    let up = poll_until(3000, Duration::from_millis(10), || {
        server.stderr().contains(" on ") || server.try_wait().is_some()
    });
    assert!(
        up && server.try_wait().is_none(),
        "the page server did not start\n{}",
        server.context()
    );
    server
}

fn source_url() -> String {
    format!("tcp://{SERVER_IP}:{PORT}")
}

/// `umm restore --source URL --key KEY --report R -- richstate restore SEED URL` in the client
/// namespace (spawned, not waited for), and R.
fn spawn_restore(
    dir: &TestDir,
    net: &NetPair,
    label: &str,
    key: &str,
    env: &[(&str, &str)],
) -> (Proc, PathBuf) {
    spawn_restore_with(dir, net, label, key, env, &[])
}

/// [`spawn_restore`] with more options of umm restore (`extra`, e.g. --tls-ca).
fn spawn_restore_with(
    dir: &TestDir,
    net: &NetPair,
    label: &str,
    key: &str,
    env: &[(&str, &str)],
    extra: &[OsString],
) -> (Proc, PathBuf) {
    let key = write_key(dir, &format!("{label}.key"), key);
    let report = dir.join(format!("{label}.report.json"));
    let url = source_url();
    let mut options: Vec<OsString> = vec!["--key".into(), key.into()];
    options.extend(extra.iter().cloned());
    let mut argv: Vec<OsString> = vec![umm_bin().into()];
    argv.extend(richstate_restore_args(&url, &report, &options, SEED));
    let mut c = NetPair::command(&net.veth.client_ns, &argv);
    c.current_dir(dir.path())
        .env("UMM_AGENT", agent_lib())
        .env_remove("UMM_SOCKET")
        .env_remove("LD_PRELOAD")
        .envs(env.iter().copied());
    (Proc::spawn(dir, label, c), report)
}

/// Whether the page server offers the urgent connection (else its test hook turns it off).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Urgent {
    Offered,
    NotOffered,
}

/// A whole restore over the link `netem` describes: every page verified by the restorer, and
/// every byte of the image fetched over the network, faults' first (on the urgent connection
/// when the server offers it).
fn restore_over(delay_ms: u32, rate: Option<&str>, name: &str, urgent: Urgent) {
    require_root_and_uffd();
    let dir = TestDir::new(name);
    let net = NetPair::new(delay_ms, rate);
    let (img, data_pages) = build_image(&dir);
    let hooks: &[(&str, &str)] = match urgent {
        Urgent::Offered => &[],
        Urgent::NotOffered => &[("UMM_TEST_NO_URGENT_CONNECTION", "1")],
    };
    let mut server = start_server(&dir, &net, &img, hooks);
    let _relay = net.start_relay(&dir);
    let (p, report) = spawn_restore(&dir, &net, "restore", KEY, &[]);
    let run = UmmRun::finish(p, &report);
    // What the restorer verified was copied in by the manager, and its data came over the
    // network: every byte of the image, faults' chunks asked urgently.
    let ok =
        assert_network_restore_verified(&run, data_pages, "the whole image came over the network");
    assert!(!run.stdout.contains("FAIL richstate"), "{}", run.context());
    assert_eq!(
        (ok.u64("children"), ok.u64("grandchildren")),
        (6, 4),
        "the restored tree forked as it should\n{}",
        run.context()
    );
    run.assert_eq("restore.handoffs", 1, "one restorer handed over");
    run.assert_ge("restore.completed", 1, "the restore completed");
    assert!(
        run.report.get("restore.failed").is_some_and(Value::is_null),
        "{}",
        run.context()
    );
    run.assert_ge("restore.network.urgent_requests", 1, "faults asked first");
    run.assert_ge("faults", 1, "the restorer's reads fault");
    let joined = run.report.get("restore.network.urgent_connection");
    if urgent == Urgent::Offered {
        // Every fault's request went on the urgent connection, and data came back on it.
        assert_eq!(joined, Some(&Value::Bool(true)), "{}", run.context());
        run.assert_eq(
            "restore.network.urgent_connection_requests",
            run.report.u64("restore.network.urgent_requests"),
            "every urgent request went on the urgent connection",
        );
        run.assert_ge(
            "restore.network.urgent_connection_bytes",
            PAGE,
            "faults' data came back on the urgent connection",
        );
    } else {
        // Without it, the restore still completes: faults go on the first connection.
        assert_eq!(joined, Some(&Value::Bool(false)), "{}", run.context());
        run.assert_eq(
            "restore.network.urgent_connection_requests",
            0,
            "no urgent connection",
        );
        assert!(
            run.stderr.contains("offers no urgent connection"),
            "no warning about the missing urgent connection\n{}",
            run.context()
        );
    }
    // The client said Complete: the server exits by itself.
    let st = server.wait_bounded(Duration::from_secs(30));
    assert!(
        st.success() && server.stderr().contains("completed its restore"),
        "the page server did not end after Complete: {}\n{}",
        describe(&st),
        server.context()
    );
}

#[test]
fn restore_over_a_veth_with_1ms_delay_verifies_every_page_fetched_over_the_network() {
    // 100 Mbit/s: the ~23 MiB take ~2 s, so the restorer's reads fault before the background
    // has fetched everything (unlimited, a loaded machine could start the restorer after it).
    restore_over(1, Some("100mbit"), "net-1ms", Urgent::Offered);
}

#[test]
fn restore_over_a_veth_with_10ms_delay_and_a_rate_limit_completes() {
    restore_over(10, Some("200mbit"), "net-10ms", Urgent::Offered);
}

/// A server without the urgent connection (its test hook): the client says so, and faults go
/// on the first connection, answered before the background; every page still verifies.
#[test]
fn without_an_urgent_connection_faults_go_on_the_first_connection_and_the_restore_completes() {
    restore_over(1, Some("100mbit"), "net-no-urgent", Urgent::NotOffered);
}

/// A restore on a slow link (the caller's `NetPair`), started and handed over, still
/// running 300 ms later: mid-transfer, for a test to break something.
fn restore_under_way(dir: &TestDir, net: &NetPair) -> (Proc, PathBuf) {
    let (mut p, report) = spawn_restore(dir, net, "restore", KEY, &[]);
    let handed = poll_until(3000, Duration::from_millis(10), || {
        p.stdout().contains("HANDED") || p.try_wait().is_some()
    });
    assert!(handed, "no handoff\n{}", p.context());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        p.try_wait().is_none(),
        "the restore ended early\n{}",
        p.context()
    );
    (p, report)
}

#[test]
fn killing_the_page_server_mid_transfer_stops_the_restored_tree() {
    require_root_and_uffd();
    let dir = TestDir::new("net-kill");
    // 8 Mbit/s: the 23 MiB image takes ~25 s, so the server dies mid-transfer.
    let net = NetPair::new(1, Some("8mbit"));
    let (img, _) = build_image(&dir);
    let mut server = start_server(&dir, &net, &img, &[]);
    let _relay = net.start_relay(&dir);
    let (p, report) = restore_under_way(&dir, &net);
    server.kill();
    let run = UmmRun::finish(p, &report);
    assert_restore_stopped(&run, "page server");
    let fetched = run.report.u64("restore.network.bytes_fetched");
    assert!(
        fetched < img_data_len(&img),
        "the whole image had arrived ({fetched} bytes) before the server was killed\n{}",
        run.context()
    );
}

fn img_data_len(img: &Path) -> u64 {
    fs::metadata(img.join("pages.img"))
        .expect("pages.img")
        .len()
}

#[test]
fn a_chunk_corrupted_in_transit_is_refused_and_stops_the_restore() {
    restore_with_a_flipped_byte(
        "net-corrupt",
        ("UMM_TEST_CORRUPT_CHUNK", "flipped a byte of chunk 3"),
        "chunk 3",
        (Some("arrived corrupt"), None),
    );
}

/// Bytes changed in the stream after the server sealed the frame (what an attacker who can
/// inject into the TCP connection would do): the client's MAC check refuses the frame before
/// its checksums are even looked at, and the restore stops.
#[test]
fn a_frame_tampered_with_after_sealing_fails_its_mac_and_stops_the_restore() {
    restore_with_a_flipped_byte(
        "net-tamper",
        (
            "UMM_TEST_TAMPER_SEALED_CHUNK",
            "flipped a byte of chunk 3 after sealing",
        ),
        "fails its MAC",
        // The CRC-32C must not be what caught it.
        (None, Some("arrived corrupt")),
    );
}

/// A restore from a server whose test hook (`hook.0`=3, logging `hook.1`) flips a byte of chunk
/// 3: it stops for `reason`; its stderr has `lines.0` and lacks `lines.1`.
fn restore_with_a_flipped_byte(
    name: &str,
    hook: (&str, &str),
    reason: &str,
    lines: (Option<&str>, Option<&str>),
) {
    require_root_and_uffd();
    let dir = TestDir::new(name);
    let net = NetPair::new(1, None);
    let (img, _) = build_image(&dir);
    // Chunk 3 is in the first background request: it arrives before the restorer can finish.
    let mut server = start_server(&dir, &net, &img, &[(hook.0, "3")]);
    let _relay = net.start_relay(&dir);
    let (p, report) = spawn_restore(&dir, &net, "restore", KEY, &[]);
    let run = UmmRun::finish(p, &report);
    assert_restore_stopped(&run, reason);
    if let Some(l) = lines.0 {
        assert!(run.stderr.contains(l), "no `{l}` line\n{}", run.context());
    }
    if let Some(l) = lines.1 {
        assert!(!run.stderr.contains(l), "a `{l}` line\n{}", run.context());
    }
    // The server may log the flip after the client already acted on it.
    let fired = poll_until(500, Duration::from_millis(10), || {
        server.stderr().contains(hook.1)
    });
    assert!(fired, "the test hook did not fire\n{}", server.context());
    server.kill();
}

#[test]
fn a_client_with_a_wrong_key_is_refused_with_a_log_line() {
    require_root_and_uffd();
    let dir = TestDir::new("net-badkey");
    let net = NetPair::new(1, None);
    let (img, _) = build_image(&dir);
    let mut server = start_server(&dir, &net, &img, &[]);
    let _relay = net.start_relay(&dir);
    let (mut p, _report) = spawn_restore(&dir, &net, "badkey", "not the key of this server", &[]);
    let st = p.wait_bounded(LIMIT);
    p.assert_group_gone();
    assert!(!st.success(), "a wrong key was accepted\n{}", p.context());
    assert!(
        p.stderr().contains("refused") && !p.stdout().contains("HANDED"),
        "the client did not say it was refused, or a restorer ran\n{}",
        p.context()
    );
    let refused = poll_until(500, Duration::from_millis(10), || {
        server.stderr().contains("wrong key")
    });
    let lines = server
        .stderr()
        .lines()
        .filter(|l| l.contains("refused"))
        .count();
    assert!(
        refused && lines == 1,
        "want exactly one log line refusing the peer\n{}",
        server.context()
    );
    assert!(
        server.try_wait().is_none(),
        "the server died\n{}",
        server.context()
    );
    server.kill();
}

/// `--tls-cert`/`--tls-key` of the page server.
fn server_tls_args(certs: &tls::TestCerts) -> Vec<OsString> {
    vec![
        "--tls-cert".into(),
        certs.cert.clone().into(),
        "--tls-key".into(),
        certs.key.clone().into(),
    ]
}

#[test]
fn restore_over_tls_verifies_every_page_and_reports_tls() {
    require_root_and_uffd();
    let dir = TestDir::new("net-tls");
    // Rate-limited, so the restorer's reads fault before the background fetched everything.
    let net = NetPair::new(1, Some("100mbit"));
    let certs = tls::TestCerts::make(&dir, &[SERVER_IP]);
    let (img, data_pages) = build_image(&dir);
    let mut server = start_server_with(&dir, &net, &img, &[], &server_tls_args(&certs));
    let _relay = net.start_relay(&dir);
    // The certificate is checked against the host in the URL (an IP address in its SAN).
    let extra: Vec<OsString> = vec!["--tls-ca".into(), certs.ca.clone().into()];
    let (p, report) = spawn_restore_with(&dir, &net, "restore", KEY, &[], &extra);
    let run = UmmRun::finish(p, &report);
    assert_network_restore_verified(
        &run,
        data_pages,
        "the whole image came over the TLS connection",
    );
    run.assert_ge("restore.network.urgent_requests", 1, "faults asked first");
    // The urgent connection is a TLS connection too, joined to the first one's session.
    assert_eq!(
        run.report.get("restore.network.urgent_connection"),
        Some(&Value::Bool(true)),
        "{}",
        run.context()
    );
    run.assert_eq(
        "restore.network.urgent_connection_requests",
        run.report.u64("restore.network.urgent_requests"),
        "every urgent request went on the urgent TLS connection",
    );
    tls::assert_report_says_tls(&run);
    let st = server.wait_bounded(Duration::from_secs(30));
    assert!(
        st.success()
            && server.stderr().contains("(TLS)")
            && server.stderr().contains("completed its restore"),
        "the TLS page server did not serve to Complete: {}\n{}",
        describe(&st),
        server.context()
    );
}

/// `umm restore` against the server with `extra` options: refused before any restorer ran
/// (no handoff, its process group gone), and its stderr.
fn refused_restore(dir: &TestDir, net: &NetPair, label: &str, extra: &[OsString]) -> String {
    let (mut p, _report) = spawn_restore_with(dir, net, label, KEY, &[], extra);
    p.assert_refused_before_handoff(LIMIT)
}

#[test]
fn tls_refuses_a_wrong_ca_a_wrong_name_and_plain_peers_clearly() {
    require_root_and_uffd();
    let dir = TestDir::new("net-tls-refused");
    let net = NetPair::new(0, None);
    let certs = tls::TestCerts::make(&dir, &[SERVER_IP]);
    let (img, _) = build_image(&dir);
    let mut server = start_server_with(&dir, &net, &img, &[], &server_tls_args(&certs));
    let relay = net.start_relay(&dir);

    let wrong_ca: Vec<OsString> = vec!["--tls-ca".into(), certs.other_ca.clone().into()];
    let err = refused_restore(&dir, &net, "wrong-ca", &wrong_ca);
    assert!(
        err.contains("TLS handshake failed") && err.contains("UnknownIssuer"),
        "a server whose certificate the CA did not sign was not refused clearly:\n{err}"
    );
    let wrong_name: Vec<OsString> = vec![
        "--tls-ca".into(),
        certs.ca.clone().into(),
        "--tls-server-name".into(),
        "not-the-server.example".into(),
    ];
    let err = refused_restore(&dir, &net, "wrong-name", &wrong_name);
    assert!(
        err.contains("TLS handshake failed") && err.contains("not valid for name"),
        "a certificate for another name was not refused clearly:\n{err}"
    );
    let err = refused_restore(&dir, &net, "plain-client", &[]);
    assert!(
        err.contains("requires TLS"),
        "a plain client was not told the server requires TLS:\n{err}"
    );
    let server_log = |server: &mut Proc, want: &str| {
        let seen = poll_until(500, Duration::from_millis(10), || {
            server.stderr().contains(want)
        });
        assert!(
            seen && server.try_wait().is_none(),
            "the server did not log {want:?}, or died\n{}",
            server.context()
        );
    };
    server_log(&mut server, "not a TLS client");
    server_log(&mut server, "TLS handshake failed");
    server.kill();
    drop(relay);

    // A plain server and a TLS client: the client says the server does not speak TLS.
    let mut plain = start_server(&dir, &net, &img, &[]);
    let _relay = net.start_relay(&dir);
    let tls_client: Vec<OsString> = vec!["--tls-ca".into(), certs.ca.clone().into()];
    let err = refused_restore(&dir, &net, "tls-client", &tls_client);
    assert!(
        err.contains("does not speak TLS"),
        "a TLS client of a plain server did not say the server does not speak TLS:\n{err}"
    );
    server_log(&mut plain, "it speaks TLS; this server does not");
    plain.kill();
}

/// A live `richstate build SEED` (the migration's source), its stdin a FIFO the test holds
/// open: a line written there makes it verify its own memory and print its OK line.
struct LiveSource {
    proc: Proc,
    stdin: fs::File,
    pid: u32,
    data_pages: u64,
    ranges: Vec<String>,
}

fn start_live_source(dir: &TestDir) -> LiveSource {
    let fifo = dir.join("source.stdin");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    // Read and write: opening never blocks, and the source never sees EOF.
    let stdin = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .expect("open the FIFO");
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("exec \"$0\" build \"$1\" < \"$2\"")
        .arg(richstate())
        .arg(SEED)
        .arg(&fifo);
    let mut proc = Proc::spawn(dir, "source", c);
    let ready = poll_until(3000, Duration::from_millis(10), || {
        proc.stdout().contains("\nRANGES ") || proc.try_wait().is_some()
    });
    assert!(ready, "the source never became ready\n{}", proc.context());
    let out = proc.stdout();
    let ready_line = out
        .lines()
        .find_map(|l| l.strip_prefix("READY "))
        .expect("READY");
    let field = |key: &str| -> u64 {
        ready_line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {ready_line:?}"))
    };
    let ranges = out
        .lines()
        .find_map(|l| l.strip_prefix("RANGES "))
        .expect("RANGES")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    LiveSource {
        pid: field("pid") as u32,
        data_pages: field("data_pages"),
        proc,
        stdin,
        ranges,
    }
}

/// `umm migrate-source PID --listen .. --key .. --range ..` in the server namespace, serving.
fn start_migrate_source(dir: &TestDir, net: &NetPair, src: &LiveSource) -> Proc {
    let key = write_key(dir, "server.key", KEY);
    let mut argv: Vec<OsString> = vec![
        umm_bin().into(),
        "migrate-source".into(),
        src.pid.to_string().into(),
        "--listen".into(),
        net.server_listen().into(),
        "--key".into(),
        key.into(),
    ];
    argv.extend(src.ranges.iter().map(OsString::from));
    let mut m = Proc::spawn(
        dir,
        "migrate-source",
        NetPair::command(&net.veth.server_ns, &argv),
    );
    let up = poll_until(3000, Duration::from_millis(10), || {
        m.stderr().contains("serving on") || m.try_wait().is_some()
    });
    assert!(
        up && m.try_wait().is_none(),
        "umm migrate-source did not start serving\n{}",
        m.context()
    );
    m
}

#[test]
fn migrate_source_moves_a_live_process_to_the_other_namespace_and_kills_it_after_complete() {
    require_root_and_uffd();
    let dir = TestDir::new("net-migrate");
    let net = NetPair::new(1, None);
    let mut src = start_live_source(&dir);
    let mut mig = start_migrate_source(&dir, &net, &src);
    let _relay = net.start_relay(&dir);
    let (p, report) = spawn_restore(&dir, &net, "restore", KEY, &[]);
    let run = UmmRun::finish(p, &report);
    assert_network_restore_verified(
        &run,
        src.data_pages,
        "every data page of the live process came over the network",
    );
    // Complete: the source process is killed, and migrate-source ends.
    let st = mig.wait_bounded(Duration::from_secs(30));
    assert!(
        st.success() && mig.stderr().contains("completed its restore"),
        "migrate-source: {}\n{}",
        describe(&st),
        mig.context()
    );
    let st = src.proc.wait_bounded(Duration::from_secs(30));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(9),
        "the source was not killed after Complete: {}\n{}",
        describe(&st),
        src.proc.context()
    );
    assert!(
        !src.proc.stdout().contains("OK richstate-build"),
        "the source ran on\n{}",
        src.proc.context()
    );
}

#[test]
fn migrate_source_resumes_the_source_when_the_destination_dies_mid_way() {
    require_root_and_uffd();
    let dir = TestDir::new("net-migrate-fail");
    // 8 Mbit/s: the 23 MiB take ~25 s, so the destination dies mid-transfer.
    let net = NetPair::new(1, Some("8mbit"));
    let mut src = start_live_source(&dir);
    let mut mig = start_migrate_source(&dir, &net, &src);
    let _relay = net.start_relay(&dir);
    let (mut p, _report) = restore_under_way(&dir, &net);
    // The destination's umm dies; its keeper stops the restored tree.
    p.signal(nix::sys::signal::Signal::SIGKILL);
    p.wait_bounded(LIMIT);
    p.assert_group_gone();
    // Stopped, not left to run on zero pages: it neither finished nor saw wrong memory.
    assert!(
        !p.stdout().contains("OK richstate") && !p.stdout().contains("FAIL richstate"),
        "{}",
        p.context()
    );
    let st = mig.wait_bounded(Duration::from_secs(60));
    assert!(
        !st.success() && mig.stderr().contains("resumed untouched"),
        "migrate-source: {}\n{}",
        describe(&st),
        mig.context()
    );
    assert!(
        src.proc.try_wait().is_none(),
        "the source died\n{}",
        src.proc.context()
    );
    // Resumed as it was: it verifies its own memory.
    std::io::Write::write_all(&mut src.stdin, b"verify\n").expect("write to the source");
    let st = src.proc.wait_bounded(LIMIT);
    assert!(
        st.success() && src.proc.stdout().contains("OK richstate-build"),
        "the resumed source did not verify its memory: {}\n{}",
        describe(&st),
        src.proc.context()
    );
}

/// A page server out of file descriptors: `accept` fails at once for as long as a connection
/// waits in the backlog. The server must wait between tries (and say so a few times), not
/// spin a CPU writing a log line per try. (Loopback in this namespace: no veth needed.)
#[test]
fn a_page_server_out_of_fds_waits_between_failed_accepts() {
    let dir = TestDir::new("net-emfile");
    let (img, _) = build_image(&dir);
    let key = write_key(&dir, "server.key", KEY);
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("ulimit -n 24 && exec \"$@\"")
        .arg("sh")
        .arg(umm_bin())
        .args(["page-server", "--listen", "127.0.0.1:0", "--image"])
        .arg(&img)
        .arg("--key")
        .arg(&key);
    let mut server = Proc::spawn(&dir, "page-server", c);
    let up = poll_until(3000, Duration::from_millis(10), || {
        server.stderr().contains(" on 127.0.0.1:") || server.try_wait().is_some()
    });
    assert!(
        up && server.try_wait().is_none(),
        "no server\n{}",
        server.context()
    );
    let port: u16 = {
        let err = server.stderr();
        let at = err.find(" on 127.0.0.1:").expect("address") + " on 127.0.0.1:".len();
        let digits: String = err[at..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().expect("port")
    };
    // Peers that send nothing: each holds a server fd (for the server's first-bytes wait),
    // until the fds run out and the last ones wait in the backlog.
    let peers: Vec<std::net::TcpStream> = (0..40)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    let exhausted = poll_until(3000, Duration::from_millis(10), || {
        server.stderr().contains("accept")
    });
    assert!(exhausted, "accept never failed\n{}", server.context());
    // A window in which a spinning server writes thousands of lines.
    std::thread::sleep(Duration::from_secs(1));
    let failures = server
        .stderr()
        .lines()
        .filter(|l| l.contains("accept"))
        .count();
    drop(peers);
    assert!(
        server.try_wait().is_none(),
        "the server died\n{}",
        server.context()
    );
    server.kill();
    assert!(
        failures < 100,
        "{failures} log lines of failed accepts in about a second: the server spins"
    );
}

/// A peer that trickles its handshake (a byte now and then, each within the per-read timeout)
/// cannot hold `umm migrate-source` (whose source stays frozen meanwhile) past the handshake
/// deadline: the connection is closed, and the next peer is taken.
#[test]
fn a_trickling_peer_cannot_hold_up_migrate_source_past_the_handshake_deadline() {
    use std::io::{Read, Write};
    require_root_and_uffd();
    let dir = TestDir::new("net-trickle");
    let src = start_live_source(&dir);
    let key = write_key(&dir, "server.key", KEY);
    let mut c = Command::new(umm_bin());
    c.arg("migrate-source")
        .arg(src.pid.to_string())
        .args(["--listen", "127.0.0.1:0", "--key"])
        .arg(&key)
        .args(&src.ranges)
        .env("UMM_TEST_HANDSHAKE_DEADLINE_MS", "1000");
    let mut mig = Proc::spawn(&dir, "migrate-source", c);
    let up = poll_until(3000, Duration::from_millis(10), || {
        mig.stderr().contains("serving on 127.0.0.1:") || mig.try_wait().is_some()
    });
    assert!(up && mig.try_wait().is_none(), "{}", mig.context());
    let port: u16 = {
        let err = mig.stderr();
        let at =
            err.find("serving on 127.0.0.1:").expect("address") + "serving on 127.0.0.1:".len();
        let digits: String = err[at..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().expect("port")
    };
    // Two trickling peers, one after the other: each says Hello, reads the Challenge, then
    // sends its Auth one byte every 300 ms (each read well within the per-read timeout; the
    // whole frame would take ~17 s). Each is closed at the deadline (the second is only read
    // once the first is gone).
    use umm::netproto::{self as np, Frame};
    let auth = Frame::Auth {
        nonce: [7; np::NONCE_LEN],
        mac: [9; np::MAC_LEN],
    }
    .encode();
    for n in 1..=2 {
        let mut peer = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        np::write_frame(
            &mut peer,
            &Frame::Hello {
                features: np::FEATURES,
            },
        )
        .unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert!(
            matches!(np::read_frame(&mut peer), Ok(Frame::Challenge { .. })),
            "no Challenge for peer {n}\n{}",
            mig.context()
        );
        peer.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut closed = false;
        // 12 s at most: far past the 1 s deadline, well before the Auth would be complete.
        for &byte in auth.iter().take(40) {
            if peer.write_all(&[byte]).is_err() {
                closed = true;
                break;
            }
            let mut b = [0u8; 64];
            match peer.read(&mut b) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        assert!(
            closed,
            "trickling peer {n} was never closed\n{}",
            mig.context()
        );
        let logged = poll_until(500, Duration::from_millis(10), || {
            mig.stderr().matches("handshake not done within").count() >= n
        });
        assert!(logged, "no deadline line for peer {n}\n{}", mig.context());
    }
    // No destination came: the source is resumed untouched when migrate-source is stopped.
    mig.signal(nix::sys::signal::Signal::SIGTERM);
    mig.wait_bounded(LIMIT);
    assert!(
        mig.stderr().contains("resumed untouched"),
        "{}",
        mig.context()
    );
    let mut src = src;
    std::io::Write::write_all(&mut src.stdin, b"verify\n").expect("write to the source");
    let st = src.proc.wait_bounded(LIMIT);
    assert!(
        st.success() && src.proc.stdout().contains("OK richstate-build"),
        "the resumed source did not verify its memory: {}\n{}",
        describe(&st),
        src.proc.context()
    );
}
