//! Throwaway TLS material for the tests (issue 9): a CA and a server certificate it signed,
//! made at test time with the openssl CLI (`make test-deps` installs it), in the test's
//! directory. EC P-256 keys: quick to make.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{TestDir, UmmRun};

/// The DNS name every test server certificate carries (besides its IP addresses).
pub const SERVER_NAME: &str = "umm-test-server";

pub struct TestCerts {
    /// The CA that signed `cert` (what a client trusts).
    pub ca: PathBuf,
    /// Another CA, which signed nothing here (a client that trusts it must refuse).
    pub other_ca: PathBuf,
    /// The server's certificate (SAN: SERVER_NAME and `ips`) and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "openssl: {e} (`make test-deps` installs the openssl CLI: apt-get install openssl)"
            )
        });
    assert!(
        out.status.success(),
        "openssl {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    dir.join(pem)
}

impl TestCerts {
    /// A CA, a server certificate for SERVER_NAME and `ips`, and an unrelated CA.
    pub fn make(dir: &TestDir, ips: &[&str]) -> TestCerts {
        let d = dir.path();
        let ca = make_ca(d, "test-ca");
        let other_ca = make_ca(d, "other-ca");
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "server.tls.key",
                "-out",
                "server.csr",
                "-subj",
                &format!("/CN={SERVER_NAME}"),
            ],
        );
        let mut san = format!("subjectAltName=DNS:{SERVER_NAME}");
        for ip in ips {
            san.push_str(&format!(",IP:{ip}"));
        }
        std::fs::write(
            d.join("server.ext"),
            format!("{san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
        )
        .expect("write server.ext");
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "test-ca.pem",
                "-CAkey",
                "test-ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        TestCerts {
            ca,
            other_ca,
            cert: d.join("server.pem"),
            key: d.join("server.tls.key"),
        }
    }
}

/// The restore's report says its network source used TLS (`restore.network.tls`).
pub fn assert_report_says_tls(run: &UmmRun) {
    assert_eq!(
        run.report
            .get("restore.network.tls")
            .and_then(serde_json::Value::as_bool),
        Some(true),
        "the report says TLS was used\n{}",
        run.context()
    );
}
