//! `umm restore --source http://HOST:PORT/PATH/` (issue 9): an image directory served by nginx
//! on loopback (a child of the test, with its own minimal configuration, on a free port,
//! killed by pid at the end; `make test-deps` installs nginx). The reference restorer
//! (`richstate restore`) verifies every page; the report shows the bytes that came over HTTP.
//! A data file with a flipped byte is refused and the restore stopped (fail-stop).
//! `https://`: nginx with a certificate from a throwaway CA (tests/common/tls.rs); nginx's
//! access log shows connections are kept alive, and a `/private/` path wants a bearer token
//! (`--http-header-file`).

mod common;

use std::ffi::OsString;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const SEED: &str = "0x5eed";

fn nginx_bin() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!("nginx is not installed (`make test-deps` installs it: apt-get install nginx)");
}

/// nginx serving `root` on 127.0.0.1:port, one process (no daemon, no workers), its files in
/// the test directory.
struct Nginx {
    proc: Proc,
    port: u16,
}

impl Nginx {
    fn start(dir: &TestDir, root: &Path) -> Nginx {
        Nginx::start_with(dir, root, "")
    }

    /// nginx speaking TLS with `certs`' server certificate; `/private/` answers only requests
    /// with `Authorization: Bearer TOKEN` (else 403); every request logged in
    /// `DIR/access.log` as `CONNECTION-SERIAL REQUESTS-ON-IT STATUS URI`.
    fn start_tls(dir: &TestDir, root: &Path, certs: &tls::TestCerts) -> Nginx {
        let server = format!(
            "ssl_certificate {}; ssl_certificate_key {}; keepalive_requests 10000; \
             location /private/ {{ if ($http_authorization != \"Bearer {TOKEN}\") \
             {{ return 403; }} }}",
            certs.cert.display(),
            certs.key.display()
        );
        Nginx::start_with(dir, root, &server)
    }

    /// `server_tls`: empty for plain HTTP, else the TLS server block's directives.
    fn start_with(dir: &TestDir, root: &Path, server_tls: &str) -> Nginx {
        let bin = nginx_bin();
        // A free port: bound, read, released (nginx binds it next).
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/nginx.error.log info;\nevents {{ worker_connections 256; }}\n\
             http {{\n  log_format conns '$connection $connection_requests $status \
             $request_uri';\n  access_log {d}/access.log conns;\n  \
             client_body_temp_path {d}/nginx-body;\n  \
             proxy_temp_path {d}/nginx-proxy;\n  fastcgi_temp_path {d}/nginx-fastcgi;\n  \
             uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n  \
             server {{ listen 127.0.0.1:{port}{}; root {}; {server_tls} }}\n}}\n",
            if server_tls.is_empty() { "" } else { " ssl" },
            root.display()
        );
        let conf_path = write_file(dir, "nginx.conf", conf.as_bytes());
        let mut c = Command::new(bin);
        c.arg("-c").arg(&conf_path).arg("-p").arg(dir.path());
        let mut proc = Proc::spawn(dir, "nginx", c);
        let up = poll_until(1000, Duration::from_millis(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok() || proc.try_wait().is_some()
        });
        assert!(
            up && proc.try_wait().is_none(),
            "nginx did not start on port {port}\n{}\n{}",
            proc.context(),
            fs::read_to_string(dir.join("nginx.error.log")).unwrap_or_default()
        );
        Nginx { proc, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}/", self.port)
    }

    fn https_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}/{path}/", self.port)
    }
}

/// The token nginx's `/private/` wants.
const TOKEN: &str = "x-test-token-0123456789";

impl Drop for Nginx {
    fn drop(&mut self) {
        self.proc.kill();
    }
}

/// An image of `richstate build SEED` (its four regions) in `DIR/www/img`, and the number of
/// data pages.
fn build_image(dir: &TestDir) -> (PathBuf, u64) {
    let img = dir.join("www/img");
    let data_pages = snapshot_richstate(dir, SEED, &img);
    (img, data_pages)
}

/// `umm restore --source URL --report R -- richstate restore SEED URL`, to its end.
fn restore_from(dir: &TestDir, label: &str, url: &str) -> UmmRun {
    restore_from_with(dir, label, url, &[])
}

/// [`restore_from`] with more options of umm restore (`extra`).
fn restore_from_with(dir: &TestDir, label: &str, url: &str, extra: &[OsString]) -> UmmRun {
    let (p, report) = spawn_restore(dir, label, url, extra);
    UmmRun::finish(p, &report)
}

/// `umm restore --source URL --report R EXTRA -- richstate restore SEED URL`, started; and R.
fn spawn_restore(dir: &TestDir, label: &str, url: &str, extra: &[OsString]) -> (Proc, PathBuf) {
    let report = dir.join(format!("{label}.report.json"));
    let mut c = Command::new(umm_bin());
    c.args(richstate_restore_args(url, &report, extra, SEED))
        .current_dir(dir.path())
        .env("UMM_AGENT", agent_lib())
        .env_remove("UMM_SOCKET")
        .env_remove("LD_PRELOAD");
    (Proc::spawn(dir, label, c), report)
}

#[test]
fn restore_from_nginx_verifies_every_page_fetched_with_range_requests() {
    require_root_and_uffd();
    let dir = TestDir::new("http-restore");
    let (_img, data_pages) = build_image(&dir);
    let nginx = Nginx::start(&dir, &dir.join("www"));
    let url = nginx.url("img");
    // No background fetch: every page comes through a fault's request (on loopback the
    // background could otherwise fetch the whole image before the first fault).
    let run = restore_from_with(&dir, "restore", &url, &["--no-background".into()]);
    assert_network_restore_verified(&run, data_pages, "every data page came over HTTP");
    run.assert_ge("restore.network.urgent_requests", 1, "faults asked first");
    assert_eq!(
        run.report
            .get("restore.network.source")
            .and_then(Value::as_str),
        Some(url.as_str()),
        "{}",
        run.context()
    );
}

#[test]
fn a_corrupted_data_file_on_the_http_server_is_refused_and_stops_the_restore() {
    require_root_and_uffd();
    let dir = TestDir::new("http-corrupt");
    let (img, _) = build_image(&dir);
    // Chunk 3 (bytes 0x30000..0x40000): in the first background request, and in region A,
    // which the restorer reads in full.
    let data = img.join("pages.img");
    let mut bytes = fs::read(&data).expect("pages.img");
    bytes[3 * 65536 + 100] ^= 0x40;
    fs::write(&data, &bytes).expect("write pages.img");
    let nginx = Nginx::start(&dir, &dir.join("www"));
    let run = restore_from(&dir, "restore", &nginx.url("img"));
    assert_restore_stopped(&run, "chunk 3");
    assert!(
        run.stderr.contains("arrived corrupt"),
        "the corrupt chunk is not named\n{}",
        run.context()
    );
}

/// An image in `DIR/www/img`, also reachable as `/private/img/` (a symlink), nginx with TLS,
/// the certificates and the header file that opens `/private/`.
fn https_setup(dir: &TestDir) -> (Nginx, tls::TestCerts, PathBuf, u64) {
    let (_img, data_pages) = build_image(dir);
    std::os::unix::fs::symlink(".", dir.join("www/private")).expect("symlink www/private");
    let certs = tls::TestCerts::make(dir, &["127.0.0.1"]);
    let nginx = Nginx::start_tls(dir, &dir.join("www"), &certs);
    let headers = write_file(
        dir,
        "headers",
        format!("# for /private/\nAuthorization: Bearer {TOKEN}\n").as_bytes(),
    );
    (nginx, certs, headers, data_pages)
}

#[test]
fn restore_over_https_reuses_connections_and_sends_the_header_file() {
    require_root_and_uffd();
    let dir = TestDir::new("https-restore");
    let (nginx, certs, headers, data_pages) = https_setup(&dir);
    let url = nginx.https_url("private/img");
    let extra: Vec<OsString> = vec![
        "--tls-ca".into(),
        certs.ca.clone().into(),
        "--http-header-file".into(),
        headers.into(),
    ];
    let run = restore_from_with(&dir, "restore", &url, &extra);
    assert_network_restore_verified(&run, data_pages, "every data page came over https");
    tls::assert_report_says_tls(&run);
    assert!(
        !run.stderr.contains(TOKEN),
        "a header value was logged\n{}",
        run.context()
    );
    // nginx's log: every request for the image's files (all let through by the header), and
    // on how many connections they came.
    let log = fs::read_to_string(dir.join("access.log")).expect("nginx access.log");
    let mut requests = 0u64;
    let mut connections = std::collections::BTreeSet::new();
    for line in log.lines().filter(|l| l.contains("/private/img/")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(
            f.len() == 4 && (f[2] == "200" || f[2] == "206"),
            "nginx refused or failed a request: {line}\n{log}"
        );
        requests += 1;
        connections.insert(f[0].to_string());
    }
    let asked = run.counter("restore.network.requests");
    assert!(
        requests >= asked + 2,
        "nginx saw {requests} requests, umm sent {asked} Range requests plus the manifest and \
         checksums\n{log}"
    );
    assert!(
        (connections.len() as u64) * 2 <= requests,
        "{} connections for {requests} requests: connections are not kept alive\n{log}",
        connections.len()
    );
    eprintln!(
        "https: {requests} requests on {} connections",
        connections.len()
    );
}

#[test]
fn https_without_the_header_or_with_another_ca_is_refused_clearly() {
    require_root_and_uffd();
    let dir = TestDir::new("https-refused");
    let (nginx, certs, headers, _) = https_setup(&dir);
    let url = nginx.https_url("private/img");
    let refused = |label: &str, extra: Vec<OsString>| {
        let (mut p, _report) = spawn_restore(&dir, label, &url, &extra);
        p.assert_refused_before_handoff(Duration::from_secs(120))
    };
    let err = refused(
        "no-header",
        vec!["--tls-ca".into(), certs.ca.clone().into()],
    );
    assert!(
        err.contains("HTTP status 403") && err.contains("credentials"),
        "a 403 was not reported as refused access:\n{err}"
    );
    let err = refused(
        "other-ca",
        vec![
            "--tls-ca".into(),
            certs.other_ca.clone().into(),
            "--http-header-file".into(),
            headers.clone().into(),
        ],
    );
    assert!(
        err.contains("UnknownIssuer") && !err.contains(TOKEN),
        "a server certificate the CA did not sign was not refused clearly:\n{err}"
    );
}
