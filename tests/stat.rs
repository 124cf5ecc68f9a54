//! Live status: the control socket (`stat`, `metrics`), `umm stat`, and `umm daemon --metrics`
//! over HTTP — answered by the manager's own loop while it serves faults, never stalled by a
//! slow client, closed to other uids.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const READY_WAIT: Duration = Duration::from_secs(60);

fn control_path(d: &UmmDaemon) -> PathBuf {
    let mut p = d.sock.as_os_str().to_owned();
    p.push(".ctl");
    p.into()
}

/// One request on the control socket; the whole answer (the manager closes after it).
fn ask(path: &Path, request: &str) -> String {
    let mut s =
        UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("read the answer to {request}: {e}"));
    out
}

fn stat(path: &Path) -> Value {
    let text = ask(path, "stat");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("stat is not JSON ({e}): {text}"))
}

fn num(v: &Value, ptr: &str) -> u64 {
    v.pointer(ptr)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{ptr} missing in {v}"))
}

fn wait_for_output(p: &mut Proc, needle: &str) -> bool {
    poll_until(
        (READY_WAIT.as_millis() / 5) as u32,
        Duration::from_millis(5),
        || p.stdout().contains(needle) || p.try_wait().is_some(),
    ) && p.stdout().contains(needle)
}

/// memhog MB under daemon `d` (it must be managed: `UMM_REQUIRE=1`), its checksum the same as
/// a native run's.
fn served_memhog(dir: &TestDir, d: &UmmDaemon, mb: &str) {
    let mut hog = Proc::spawn(dir, "memhog", d.served(target("memhog"), &[mb]));
    let st = hog.wait_bounded(Duration::from_secs(120));
    assert!(st.success(), "memhog: {}\n{}", describe(&st), hog.context());
    let ok = OkLine::find(&hog.stdout(), "memhog").expect("memhog OK line");
    let native = run_native(
        dir,
        "memhog-native",
        &[target("memhog").to_str().unwrap(), mb],
        &[],
        Duration::from_secs(60),
    );
    assert_eq!(ok.checksum(), native.ok_line("memhog").checksum());
}

/// Prometheus text format 0.0.4, checked strictly enough to catch what scrapers reject:
/// every sample's family has HELP and TYPE (given before it), names are valid, counters end
/// in `_total`, values are floats. Returns each sample (`name{labels}`) with its value.
fn check_prometheus(text: &str) -> HashMap<String, f64> {
    let valid = |n: &str| {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    };
    let mut help = HashMap::new();
    let mut kind: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, doc) = rest.split_once(' ').expect("HELP has a text");
            assert!(valid(name) && !doc.is_empty(), "bad HELP line: {line}");
            assert!(
                help.insert(name.to_string(), ()).is_none(),
                "two HELP for {name}"
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, k) = rest.split_once(' ').expect("TYPE has a kind");
            assert!(valid(name), "bad TYPE line: {line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&k),
                "bad type in {line}"
            );
            if k == "counter" {
                assert!(
                    name.ends_with("_total"),
                    "counter {name} does not end in _total"
                );
            }
            assert!(
                kind.insert(name.to_string(), k.to_string()).is_none(),
                "two TYPE for {name}"
            );
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "unexpected line: {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let name = series.split('{').next().unwrap();
        assert!(valid(name), "invalid metric name in {line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(
                labels.starts_with('{') && labels.ends_with('}'),
                "bad labels in {line}"
            );
            for pair in labels[1..labels.len() - 1].split(',') {
                let (k, v) = pair.split_once('=').expect("label=value");
                assert!(
                    valid(k) && v.starts_with('"') && v.ends_with('"'),
                    "bad label {pair}"
                );
            }
        }
        let family = if kind.contains_key(name) {
            name.to_string()
        } else {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or_else(|| panic!("sample {name} has no TYPE line before it"));
            assert!(
                matches!(
                    kind.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                ),
                "sample {name}: no TYPE for it or for a histogram {base}"
            );
            base.to_string()
        };
        assert!(
            help.contains_key(&family),
            "sample {name}: no HELP for {family}"
        );
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|e| panic!("value of {line}: {e}")),
        };
        assert!(
            samples.insert(series.to_string(), v).is_none(),
            "sample {series} twice"
        );
    }
    samples
}

fn metric(samples: &HashMap<String, f64>, series: &str) -> u64 {
    let v = samples
        .get(series)
        .unwrap_or_else(|| panic!("no sample {series} in the metrics"));
    *v as u64
}

#[test]
fn prometheus_checker_rejects_what_scrapers_reject() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{k=\"v\"} 3\n\
                # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.5\nh_count 1\n";
    assert_eq!(check_prometheus(good).len(), 4);
    for bad in [
        "# HELP a A.\n# TYPE a counter\na 1\n", // counter without _total
        "# TYPE a_total counter\na_total 1\n",  // no HELP
        "# HELP a_total A.\na_total 1\n",       // no TYPE
        "# HELP a A.\n# TYPE a gauge\na one\n", // not a float
        "# HELP 1a A.\n# TYPE 1a gauge\n1a 1\n", // bad name
    ] {
        assert!(
            std::panic::catch_unwind(|| check_prometheus(bad)).is_err(),
            "accepted: {bad}"
        );
    }
}

#[test]
fn stat_answers_while_the_manager_serves_a_fault_storm() {
    require_root_and_uffd();
    let dir = TestDir::new("stat-load");
    let d = UmmDaemon::start(&dir);
    let ctl = control_path(&d);
    let go = dir.join("go");
    let mut storm = Proc::spawn(
        &dir,
        "storm",
        d.served(target("storm"), &["2", "256", go.to_str().unwrap(), "20"]),
    );
    assert!(
        wait_for_output(&mut storm, "RUNNING storm"),
        "storm never started\n{}",
        storm.context()
    );
    let first = stat(&ctl);
    assert!(
        num(&first, "/address_spaces") >= 1,
        "the storm is managed: {first}"
    );
    assert!(num(&first, "/memory/registered") > 0, "{first}");
    // The storm faults all the time: the counters grow between samples (bounded wait).
    let mut second = first.clone();
    let grew = poll_until(600, Duration::from_millis(50), || {
        second = stat(&ctl);
        num(&second, "/report/faults") > num(&first, "/report/faults")
            && num(&second, "/report/pages_served") > num(&first, "/report/pages_served")
    });
    assert!(grew, "faults did not grow under load:\n{first}\n{second}");
    assert!(
        second["sampled_at"].as_f64() > first["sampled_at"].as_f64()
            && second["uptime_s"].as_f64() > first["uptime_s"].as_f64(),
        "{first}\n{second}"
    );
    // `umm stat` shows the same as a table and as JSON.
    let out = Command::new(umm_bin())
        .args(["stat", "--control"])
        .arg(&ctl)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && table.contains("faults"), "{out:?}");
    let out = Command::new(umm_bin())
        .args(["stat", "--json", "--socket"])
        .arg(&d.sock)
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).expect("umm stat --json is JSON");
    assert!(num(&json, "/report/faults") >= num(&second, "/report/faults"));

    std::fs::write(&go, b"").unwrap();
    let st = storm.wait_bounded(Duration::from_secs(120));
    assert!(
        st.success(),
        "storm: {}\n{}",
        describe(&st),
        storm.context()
    );
    let ok = OkLine::find(&storm.stdout(), "storm").expect("storm OK line");
    assert_eq!(
        ok.u64("before"),
        1,
        "the region was registered: {:?}",
        ok.fields
    );
    let report = d.stop();
    assert!(
        report.u64("faults") >= num(&second, "/report/faults"),
        "the final report counts at least what stat showed"
    );
}

#[test]
fn metrics_parse_as_prometheus_text_and_match_the_report() {
    require_root_and_uffd();
    let dir = TestDir::new("stat-metrics");
    let mut d = UmmDaemon::start(&dir);
    let ctl = control_path(&d);
    served_memhog(&dir, &d, "16");
    d.assert_fds_back("memhog exited");
    let samples = check_prometheus(&ask(&ctl, "metrics"));
    let report = d.stop();
    assert!(
        report.u64("pages_served") >= 4096,
        "memhog's 16 MiB were served"
    );
    for (series, path) in [
        ("umm_faults_total", "faults"),
        ("umm_pages_served_total", "pages_served"),
        ("umm_served_bytes_total", "bytes_served"),
        ("umm_handoffs_total", "handoffs"),
        ("umm_processes_total", "processes"),
        ("umm_events_total{kind=\"unmap\"}", "events.unmap"),
        ("umm_fault_latency_seconds_count", "faults"),
    ] {
        assert_eq!(
            metric(&samples, series),
            report.u64(path),
            "{series} vs {path}"
        );
    }
    let inf = metric(&samples, "umm_fault_latency_seconds_bucket{le=\"+Inf\"}");
    let below_16s = metric(
        &samples,
        "umm_fault_latency_seconds_bucket{le=\"16.777216\"}",
    );
    assert!(inf >= below_16s && below_16s > 0, "cumulative buckets");
}

/// A free loopback port (bound, then released for the daemon).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn http(port: u16, request: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to --metrics");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the HTTP answer");
    out
}

#[test]
fn metrics_over_http_answer_get_metrics_and_404_otherwise() {
    require_root_and_uffd();
    let dir = TestDir::new("stat-http");
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let d = UmmDaemon::start_with(
        &dir,
        "daemon",
        dir.join("umm.sock"),
        &["--metrics", &metrics],
    );
    served_memhog(&dir, &d, "4");

    let ok = http(port, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let (head, body) = ok.split_once("\r\n\r\n").expect("headers and body");
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    let samples = check_prometheus(body);
    assert!(
        metric(&samples, "umm_pages_served_total") >= 1024,
        "memhog 4 MiB served"
    );
    for bad in [
        "GET / HTTP/1.0\r\n\r\n",
        "GET /metricsx HTTP/1.0\r\n\r\n",
        "POST /metrics HTTP/1.0\r\n\r\n",
    ] {
        let answer = http(port, bad);
        assert!(answer.starts_with("HTTP/1.0 404 "), "{bad:?} -> {answer}");
    }
    d.stop();
}

#[test]
fn slow_control_clients_do_not_stall_the_loop() {
    require_root_and_uffd();
    let dir = TestDir::new("stat-slow");
    let mut d = UmmDaemon::start(&dir);
    let ctl = control_path(&d);
    // Clients that ask and never read, send half a request, send nothing, or too much.
    let mut stalled = Vec::new();
    for i in 0..20 {
        let mut s = UnixStream::connect(&ctl).expect("connect");
        match i % 4 {
            0 => s.write_all(b"metrics\n").unwrap(),
            1 => s.write_all(b"sta").unwrap(),
            2 => {}
            _ => {
                let _ = s.write_all(&[b'x'; 1000]);
            }
        }
        stalled.push(s);
    }
    // The loop still serves a target, and answers a well-behaved client.
    served_memhog(&dir, &d, "16");
    let now = stat(&ctl);
    assert!(num(&now, "/report/pages_served") >= 4096, "{now}");
    // The stalled connections are dropped by the manager (deadline), not kept forever.
    d.assert_fds_back("the stalled clients' deadline");
    for s in &mut stalled {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut sink = Vec::new();
        // EOF (the manager closed it), possibly after an answer or an error line.
        let _ = s.read_to_end(&mut sink);
    }
    d.stop();
}

#[test]
fn control_socket_refuses_other_uids() {
    require_root_and_uffd();
    let dir = TestDir::new("stat-uid");
    let d = UmmDaemon::start(&dir);
    let ctl = control_path(&d);
    let mode = std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is owner-only");
    // Open the file up, so the check that remains is the manager's SO_PEERCRED one.
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = "import socket,sys\n\
                  s=socket.socket(socket.AF_UNIX)\n\
                  s.settimeout(30)\n\
                  s.connect(sys.argv[1])\n\
                  try: s.sendall(b'stat\\n')\n\
                  except BrokenPipeError: pass\n\
                  d=b''\n\
                  while True:\n\
                  \x20   c=s.recv(65536)\n\
                  \x20   if not c: break\n\
                  \x20   d+=c\n\
                  sys.stdout.write(d.decode())\n";
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(&ctl)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run python3 as nobody");
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.starts_with("error: uid 65534 may not use this control socket"),
        "nobody got: {answer:?} (stderr {})",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!answer.contains("faults"), "no status leaked: {answer}");
    let now = stat(&ctl);
    assert_eq!(num(&now, "/control_refused"), 1, "{now}");
    let mut d = d;
    d.assert_alive("a refused control client");
    let report = d.stop();
    assert!(report.pretty().len() > 2);
}
