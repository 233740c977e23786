//! Hosts on a slow network: network namespaces on a bridge, each behind a veth whose
//! egress `tc tbf` limits. Names carry the test process's pid (other tests and other
//! people's runs use namespaces too); everything is deleted when dropped, also when the
//! test fails.

use std::process::Command;

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct SlowNet {
    bridge: String,
    namespaces: Vec<String>,
}

impl SlowNet {
    /// `hosts` namespaces on one bridge, host `i` at 10.99.0.(i+1), each sending at most
    /// `rate` (a `tc` rate, e.g. "30mbit").
    pub fn new(hosts: usize, rate: &str) -> Self {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "network namespaces need root (CI runs tests as root)"
        );
        let tag = std::process::id();
        let mut net = SlowNet {
            bridge: format!("cfb{tag}"),
            namespaces: Vec::new(),
        };
        run(&["ip", "link", "add", &net.bridge, "type", "bridge"]);
        run(&["ip", "link", "set", &net.bridge, "up"]);
        for i in 0..hosts {
            let ns = format!("codexfs-{tag}-{i}");
            let veth = format!("cfv{tag}x{i}");
            run(&["ip", "netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            run(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            run(&["ip", "link", "set", &veth, "master", &net.bridge]);
            run(&["ip", "link", "set", &veth, "up"]);
            let addr = format!("10.99.0.{}/24", i + 1);
            run(&[
                "ip", "netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", "eth0",
            ]);
            run(&[
                "ip", "netns", "exec", &ns, "ip", "link", "set", "eth0", "up",
            ]);
            run(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
            run(&[
                "ip", "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                "rate", rate, "burst", "64kb", "latency", "100ms",
            ]);
        }
        net
    }

    /// The namespace of host `i`.
    pub fn ns(&self, i: usize) -> &str {
        &self.namespaces[i]
    }

    pub fn ip(&self, i: usize) -> String {
        format!("10.99.0.{}", i + 1)
    }
}

impl Drop for SlowNet {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and with it the other end.
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}
