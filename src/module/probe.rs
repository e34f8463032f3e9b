//! The checks behind resources: one probe per `<check>` kind, and errd's count of
//! matching processes. Each answers up (true) or down (false) within its timeout.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

use super::userconfig::{Probe, Proc, ProcMatch};

/// What a probe may need from the node: other modules' states.
pub trait ModuleStates: Send + Sync {
    /// Whether module `name` is running on this node (any state but STOP).
    fn is_running(&self, name: &str) -> bool;
}

pub async fn probe(
    probe: &Probe,
    timeout: Duration,
    module_dir: &Path,
    modules: &dyn ModuleStates,
) -> bool {
    let check = async {
        match probe {
            Probe::Tcp { addr, port } => {
                tokio::net::TcpStream::connect(SocketAddr::new(*addr, *port))
                    .await
                    .is_ok()
            }
            Probe::Ping { addr } => {
                let wait = timeout.as_secs().max(1).to_string();
                let family = if addr.is_ipv6() { "-6" } else { "-4" };
                Command::new("ping")
                    .args([family, "-c", "1", "-W", &wait, &addr.to_string()])
                    .kill_on_drop(true)
                    .output()
                    .await
                    .is_ok_and(|o| o.status.success())
            }
            Probe::Intf { interface, addr } => {
                let name = match (interface, addr) {
                    (Some(name), _) => Some(name.clone()),
                    (None, Some(addr)) => interface_holding(*addr).await,
                    (None, None) => None,
                };
                match name {
                    Some(name) => {
                        std::fs::read_to_string(format!("/sys/class/net/{name}/operstate"))
                            .is_ok_and(|s| matches!(s.trim(), "up" | "unknown"))
                    }
                    None => false,
                }
            }
            Probe::Ip { addr } => interface_holding(*addr).await.is_some(),
            Probe::Custom { exec, args } => {
                let path = if exec.contains('/') {
                    Path::new(exec).to_path_buf()
                } else {
                    module_dir.join("bin").join(exec)
                };
                Command::new(path)
                    .args(args)
                    .current_dir(module_dir)
                    .kill_on_drop(true)
                    .output()
                    .await
                    .is_ok_and(|o| o.status.success())
            }
            Probe::Module { name } => modules.is_running(name),
        }
    };
    tokio::time::timeout(timeout, check).await.unwrap_or(false)
}

/// The interface that has `addr` configured, from `ip -o addr`.
async fn interface_holding(addr: IpAddr) -> Option<String> {
    let output = Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let wanted = addr.to_string();
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let address = fields.get(3)?.split('/').next()?;
        (address == wanted).then(|| fields[1].trim_end_matches(':').to_string())
    })
}

/// How many running processes match `proc`, from /proc.
pub fn count_processes(proc: &Proc) -> u32 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut count = 0;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state …": comm may hold spaces and parentheses; take to the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        if stat[close + 1..].trim_start().starts_with('Z') {
            continue; // zombies do not count as running
        }
        let name_matches = match &proc.matcher {
            ProcMatch::Name(name) => comm == name,
            ProcMatch::NameRegex(regex) => regex.is_match(comm),
        };
        if !name_matches {
            continue;
        }
        if let Some(args) = &proc.argregex {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline: String = String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .trim_end()
                .to_string();
            if !args.is_match(&cmdline) {
                continue;
            }
        }
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::module::userconfig::{Action, When};

    struct NoModules;
    impl ModuleStates for NoModules {
        fn is_running(&self, name: &str) -> bool {
            name == "other"
        }
    }

    /// The probe's answer, with a 2 s timeout; module folder `/` (tests use
    /// absolute paths).
    async fn up(probe_: Probe) -> bool {
        probe(&probe_, Duration::from_secs(2), Path::new("/"), &NoModules).await
    }

    #[tokio::test]
    async fn tcp_ip_intf_module_custom_and_ping_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let localhost: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(
            up(Probe::Tcp {
                addr: localhost,
                port
            })
            .await
        );
        drop(listener);
        assert!(
            !up(Probe::Tcp {
                addr: localhost,
                port
            })
            .await
        );
        // ip and intf read this machine's configuration: no traffic.
        assert!(up(Probe::Ip { addr: localhost }).await);
        assert!(
            !up(Probe::Ip {
                addr: "198.18.255.254".parse().unwrap()
            })
            .await
        );
        assert!(
            up(Probe::Intf {
                interface: Some("lo".into()),
                addr: None
            })
            .await
        );
        assert!(
            !up(Probe::Intf {
                interface: Some("nosuchif0".into()),
                addr: None
            })
            .await
        );
        assert!(
            up(Probe::Module {
                name: "other".into()
            })
            .await
        );
        assert!(
            !up(Probe::Module {
                name: "none".into()
            })
            .await
        );
        let custom = |exec: &str, args: &[&str]| Probe::Custom {
            exec: exec.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        assert!(up(custom("/bin/true", &[])).await);
        assert!(!up(custom("/bin/false", &[])).await);
        // A custom probe that hangs is down at its timeout.
        let hang = custom("/bin/sleep", &["10"]);
        assert!(
            !probe(
                &hang,
                Duration::from_millis(200),
                Path::new("/"),
                &NoModules
            )
            .await
        );
        // Loopback only: tests never send traffic elsewhere. (`./dev` installs ping.)
        assert!(up(Probe::Ping { addr: localhost }).await);
    }

    #[test]
    fn processes_are_counted_by_name_regex_and_arguments() {
        let mut child = std::process::Command::new("sleep")
            .arg("31.5")
            .spawn()
            .unwrap();
        let proc = |matcher, argregex: Option<&str>| Proc {
            name: "sleep".into(),
            matcher,
            argregex: argregex.map(|r| regex::Regex::new(r).unwrap()),
            atleast: 1,
            atmax: None,
            class: When::Both,
            action: Action::Restart,
        };
        // Until the child has exec'd, /proc shows it as a copy of this test.
        let exact = || proc(ProcMatch::Name("sleep".into()), Some("^sleep 31\\.5$"));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while count_processes(&exact()) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "sleep never showed up in /proc"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            count_processes(&proc(ProcMatch::Name("sleep".into()), Some("^sleep 99$"))),
            0
        );
        let regex = ProcMatch::NameRegex(regex::Regex::new("^sl.ep$").unwrap());
        assert!(count_processes(&proc(regex, Some("31\\.5"))) >= 1);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(
            count_processes(&proc(
                ProcMatch::Name("sleep".into()),
                Some("^sleep 31\\.5$")
            )),
            0
        );
    }
}
