//! `umm restore --source http://HOST:PORT/PATH/` (issue 9): an image directory served by nginx
//! on loopback (a child of the test, with its own minimal configuration, on a free port,
//! killed by pid at the end; `make test-deps` installs nginx). The reference restorer
//! (`richstate restore`) verifies every page; the report shows the bytes that came over HTTP.
//! A data file with a flipped byte is refused and the restore stopped (fail-stop).

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

fn richstate() -> PathBuf {
    target("richstate")
}

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
             http {{\n  access_log off;\n  client_body_temp_path {d}/nginx-body;\n  \
             proxy_temp_path {d}/nginx-proxy;\n  fastcgi_temp_path {d}/nginx-fastcgi;\n  \
             uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n  \
             server {{ listen 127.0.0.1:{port}; root {}; }}\n}}\n",
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
}

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
    let report = dir.join(format!("{label}.report.json"));
    let argv: Vec<OsString> = vec![
        "restore".into(),
        "--source".into(),
        url.into(),
        "--report".into(),
        report.clone().into(),
        "--".into(),
        richstate().into(),
        "restore".into(),
        SEED.into(),
        url.into(),
    ];
    let mut c = Command::new(umm_bin());
    c.args(&argv)
        .current_dir(dir.path())
        .env("UMM_AGENT", agent_lib())
        .env_remove("UMM_SOCKET")
        .env_remove("LD_PRELOAD");
    UmmRun::finish(Proc::spawn(dir, label, c), &report)
}

#[test]
fn restore_from_nginx_verifies_every_page_fetched_with_range_requests() {
    require_root_and_uffd();
    let dir = TestDir::new("http-restore");
    let (_img, data_pages) = build_image(&dir);
    let nginx = Nginx::start(&dir, &dir.join("www"));
    let url = nginx.url("img");
    let run = restore_from(&dir, "restore", &url);
    run.assert_success();
    let ok = run.ok_line("richstate");
    assert!(
        ok.u64("pages") * 10 >= data_pages * 9,
        "the restorer verified {} data pages of {data_pages}\n{}",
        ok.u64("pages"),
        run.context()
    );
    run.assert_eq("restore.killed", 0, "nothing had to be stopped");
    run.assert_ge("pages_served", ok.u64("pages"), "pages installed by umm");
    run.assert_ge(
        "restore.network.bytes_fetched",
        data_pages * PAGE,
        "every data page came over HTTP",
    );
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
    assert!(
        !run.status.success(),
        "the restore succeeded\n{}",
        run.context()
    );
    assert!(
        !run.stdout.contains("OK richstate") && !run.stdout.contains("FAIL richstate"),
        "a restored process finished, or saw wrong memory\n{}",
        run.context()
    );
    run.assert_ge("restore.killed", 1, "the restored tree was stopped");
    let failed = run
        .report
        .get("restore.failed")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(
        failed.contains("chunk 3") && run.stderr.contains("arrived corrupt"),
        "restore.failed = {failed:?}: want the corrupt chunk named\n{}",
        run.context()
    );
}

#[test]
fn https_sources_are_refused_with_a_clear_error() {
    let dir = TestDir::new("http-https");
    let mut c = Command::new(umm_bin());
    c.args([
        "restore",
        "--source",
        "https://127.0.0.1:1/img/",
        "--",
        "true",
    ]);
    let mut p = Proc::spawn(&dir, "https", c);
    let st = p.wait_bounded(Duration::from_secs(30));
    assert!(
        !st.success() && p.stderr().contains("https:// is not supported"),
        "{}\n{}",
        describe(&st),
        p.context()
    );
}
