//! Two network namespaces joined by a veth pair: for tests/net.rs, tests/criu_e2e.rs and
//! umm-bench's figure 8 (benches/src/net_fig.rs includes this file with `#[path]`).

use std::process::Command;

/// `ip ARGS`; an error carries its stderr.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (is iproute2 installed? make test-deps): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Namespaces `server_ns` and `client_ns` joined by a veth pair (`devs.0` in the first,
/// `devs.1` in the second), both ends addressed and up, loopback up. Deleted on drop (deleting
/// a namespace deletes its end of the veth, and with it the pair), also when `new` fails
/// half-way.
pub struct Veth {
    pub server_ns: String,
    pub client_ns: String,
    pub devs: (String, String),
}

impl Veth {
    /// `tag` names the namespaces (`umm-s<tag>`, `umm-c<tag>`) and the interfaces
    /// (`vs<tag>`, `vc<tag>`: at most 13 bytes of it are used, interface names have 15);
    /// `cidrs`: the server's and the client's address, e.g. `10.199.0.1/24`.
    pub fn new(tag: &str, cidrs: (&str, &str)) -> Result<Veth, String> {
        let tail = &tag[tag.len().saturating_sub(13)..];
        let veth = Veth {
            server_ns: format!("umm-s{tag}"),
            client_ns: format!("umm-c{tag}"),
            devs: (format!("vs{tail}"), format!("vc{tail}")),
        };
        let (s, c) = (veth.server_ns.as_str(), veth.client_ns.as_str());
        let (vs, vc) = (veth.devs.0.as_str(), veth.devs.1.as_str());
        ip(&["netns", "add", s])?;
        ip(&["netns", "add", c])?;
        ip(&[
            "link", "add", vs, "netns", s, "type", "veth", "peer", "name", vc, "netns", c,
        ])?;
        for (ns, dev, cidr) in [(s, vs, cidrs.0), (c, vc, cidrs.1)] {
            ip(&["-n", ns, "addr", "add", cidr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(veth)
    }

    /// The namespaces with their end of the veth: (server's, client's).
    pub fn ends(&self) -> [(&str, &str); 2] {
        [
            (&self.server_ns, &self.devs.0),
            (&self.client_ns, &self.devs.1),
        ]
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        for ns in [&self.server_ns, &self.client_ns] {
            if let Err(e) = ip(&["netns", "del", ns]) {
                // A namespace `new` never made: nothing to say.
                if !e.contains("No such file") {
                    eprintln!("cleanup: {e}");
                }
            }
        }
    }
}
