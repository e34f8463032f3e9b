//! Light modules end to end: the real binary, real packages, a real server process.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rampart::module::package::{build_zip, Content};
use serde_json::Value;
use support::{free_ports, wait_until, TestCluster, BIN};

const START_SERVER: &str = r#"#!/bin/sh
echo "starting $RAMPART_MODULE on port $PORT ($1 -> $2, $3)"
cd "$RAMPART_MODULE_VAR"
nohup python3 -m http.server "$PORT" --bind 127.0.0.1 >/dev/null 2>&1 &
echo $! > "$RAMPART_MODULE_VAR/server.pid"
"#;

const STOP_SERVER: &str = r#"#!/bin/sh
pid=$(cat "$RAMPART_MODULE_VAR/server.pid" 2>/dev/null) || exit 0
kill "$pid" 2>/dev/null
for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.2; done
[ "$3" = force ] && kill -9 "$pid"
exit 1
"#;

fn package(dir: &Path, name: &str, userconfig: &str, scripts: &[(&str, &str, u32)]) -> PathBuf {
    let mut entries = vec![(
        "conf/userconfig.xml".to_string(),
        Content::File {
            mode: 0o644,
            data: userconfig.as_bytes().to_vec(),
        },
    )];
    for (script, body, mode) in scripts {
        entries.push((
            format!("bin/{script}"),
            Content::File {
                mode: *mode,
                data: body.as_bytes().to_vec(),
            },
        ));
    }
    let path = dir.join(format!("{name}.safe"));
    std::fs::write(&path, build_zip(name, &entries)).unwrap();
    path
}

fn server_scripts() -> Vec<(&'static str, &'static str, u32)> {
    vec![
        ("start_prim", START_SERVER, 0o755),
        ("stop_prim", STOP_SERVER, 0o755),
    ]
}

struct Cli<'a> {
    cluster: &'a TestCluster,
}

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .arg("--config")
            .arg(self.cluster.dir.path().join("cluster.xml"))
            .args(["--name", "n1"])
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// `state --json`, whatever its exit code (which encodes the state).
    fn state_json(&self, module: &str) -> Value {
        let output = self.run(&["--json", "state", "-m", module]);
        serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
            panic!(
                "state of {module}: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }

    fn state_code(&self, module: &str) -> i32 {
        self.run(&["state", "-m", module]).status.code().unwrap()
    }
}

fn pid_file(cluster: &TestCluster, module: &str) -> PathBuf {
    cluster
        .dir
        .path()
        .join("data-n1/modules-var")
        .join(module)
        .join("server.pid")
}

fn read_pid(cluster: &TestCluster, module: &str) -> Option<i32> {
    std::fs::read_to_string(pid_file(cluster, module))
        .ok()?
        .trim()
        .parse()
        .ok()
}

async fn serves(port: u16) -> bool {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/"))
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

async fn restarted_after_kill(cluster: &TestCluster, module: &str, port: u16) {
    wait_until(Duration::from_secs(20), &format!("{module} serves"), || {
        serves(port)
    })
    .await;
    let first = read_pid(cluster, module).expect("a pid file");
    // SAFETY: killing the server process the module started.
    unsafe { libc::kill(first, libc::SIGKILL) };
    wait_until(
        Duration::from_secs(20),
        &format!("{module} restarted its server"),
        || async { read_pid(cluster, module).is_some_and(|p| p != first) && serves(port).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn light_modules_run_are_watched_restarted_and_stopped() {
    let mut cluster = TestCluster::new(1);
    let config = cluster.write_config("cluster.xml", 1, "secret");
    cluster.start("n1", &config).await;
    assert_eq!(
        cluster
            .post("n1", "/v1/cluster/init", serde_json::json!({}))
            .await
            .0,
        200
    );
    cluster.wait_for_agreement(&["n1"], &["n1"]).await;
    let cli = Cli { cluster: &cluster };
    let work = cluster.dir.path().to_path_buf();
    let ports = free_ports(2);

    // Phase 1: a module whose server errd watches. Install, start, kill the server:
    // errd restarts it.
    let web = package(
        &work,
        "web",
        &format!(
            r#"<safe><service mode="light" maxloop="5" loop_interval="1h">
                 <user nicestoptimeout="10s" forcestoptimeout="5s"><var name="PORT" value="{}"/></user>
                 <errd polltimer="1s"><proc name="web" nameregex="^python3" argregex="http\.server {} " atleast="1" action="restart"/></errd>
               </service></safe>"#,
            ports[0], ports[0]
        ),
        &server_scripts(),
    );
    cli.ok(&["module", "install", web.to_str().unwrap()]);
    assert!(cli.ok(&["module", "list"]).contains("web"));
    let mut events = cluster
        .http
        .get(cluster.url("n1", "/v1/events"))
        .bearer_auth(cluster.admin_token())
        .send()
        .await
        .unwrap();
    cli.ok(&["start", "-m", "web"]);
    wait_until(Duration::from_secs(20), "web is ALONE", || async {
        cli.state_code("web") == 2
    })
    .await;
    // The event stream told of it.
    let mut seen = String::new();
    while !seen.contains("\"state\":\"ALONE\"") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), events.chunk())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the stream stays open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("event: module"), "{seen}");
    restarted_after_kill(&cluster, "web", ports[0]).await;
    let log = cli.ok(&["log", "-m", "web"]);
    assert!(log.contains("proc.web is down"), "{log}");
    assert!(log.contains("restart because of proc.web"), "{log}");
    assert!(
        !log.contains("starting web on port"),
        "script output is verbose only"
    );
    let verbose = cli.ok(&["log", "-m", "web", "-v"]);
    assert!(
        verbose.contains(&format!(
            "starting web on port {} (STOP -> ALONE, start)",
            ports[0]
        )),
        "{verbose}"
    );

    // Phase 2: a module watched by a tcp checker only. Kill the server: the checker
    // sees the port closed and restarts it.
    let api = package(
        &work,
        "api",
        &format!(
            r#"<safe><service mode="light">
                 <user logging="userlog"><var name="PORT" value="{}"/></user>
                 <check><tcp ident="http"><to addr="127.0.0.1" port="{}" interval="300ms" timeout="200ms"/></tcp></check>
               </service></safe>"#,
            ports[1], ports[1]
        ),
        &server_scripts(),
    );
    let install = cli.run(&["module", "install", api.to_str().unwrap()]);
    assert!(install.status.success());
    let warnings = String::from_utf8_lossy(&install.stderr);
    assert!(
        warnings.contains("warning:") && warnings.contains("'logging'"),
        "{warnings}"
    );
    cli.ok(&["start", "-m", "api"]);
    restarted_after_kill(&cluster, "api", ports[1]).await;
    wait_until(Duration::from_secs(10), "tcp.http is up again", || async {
        cli.state_json("api")["resources"]["tcp.http"]["state"] == "up"
    })
    .await;
    let history = cli.state_json("api")["resources"]["tcp.http"]["history"].clone();
    let states: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[1].as_str().unwrap())
        .collect();
    assert!(states.ends_with(&["down", "unknown", "up"]), "{history}");
    assert!(cli.ok(&["log", "-m", "api"]).contains("tcp.http is down"));

    // Phase 3: an application that keeps dying: after maxloop restarts the module
    // stops, with the reason in its log and state.
    let crashy = package(
        &work,
        "crashy",
        r#"<safe><service mode="light" maxloop="2" loop_interval="1h">
             <errd polltimer="300ms"><proc name="crash" nameregex="^sleep$" argregex="^sleep 0\.4$" action="restart"/></errd>
           </service></safe>"#,
        &[(
            "start_prim",
            "#!/bin/sh\nnohup sleep 0.4 >/dev/null 2>&1 &\n",
            0o755,
        )],
    );
    cli.ok(&["module", "install", crashy.to_str().unwrap()]);
    cli.ok(&["start", "-m", "crashy"]);
    wait_until(
        Duration::from_secs(30),
        "crashy stopped by maxloop",
        || async {
            let state = cli.state_json("crashy");
            state["state"] == "STOP"
                && state["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("maxloop"))
        },
    )
    .await;
    assert_eq!(cli.state_code("crashy"), 0);
    let log = cli.ok(&["log", "-m", "crashy"]);
    assert_eq!(
        log.matches("restart because of proc.crash").count(),
        2,
        "{log}"
    );
    assert!(log.contains("(maxloop)"), "{log}");

    // Phase 4: a bad package and a bad configuration edit are refused, and nothing
    // changes.
    let before = cli.ok(&["module", "list"]);
    let bad = package(
        &work,
        "bad",
        "<safe><service mode=\"light\"/></safe>",
        &[("start_prim", "#!/bin/sh\n", 0o644)],
    );
    let refused = cli.run(&["module", "install", bad.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("without the run bit"));
    let edit = work.join("edit.xml");
    std::fs::write(
        &edit,
        "<safe>\n  <service mode=\"light\" maxloop=\"many\"/>\n</safe>\n",
    )
    .unwrap();
    let refused = cli.run(&["module", "config", "set", "web", edit.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("web/conf/userconfig.xml:2:3") && stderr.contains("maxloop"),
        "{stderr}"
    );
    assert_eq!(cli.ok(&["module", "list"]), before);
    assert!(cli
        .ok(&["module", "config", "get", "web"])
        .contains("loop_interval=\"1h\""));
    // A valid edit of a running module: the old package's runtime stops the server,
    // the new one starts it again.
    let current = cli.ok(&["module", "config", "get", "web"]);
    let before_pid = read_pid(&cluster, "web").expect("web runs");
    std::fs::write(&edit, current.replace("maxloop=\"5\"", "maxloop=\"6\"")).unwrap();
    cli.ok(&["module", "config", "set", "web", edit.to_str().unwrap()]);
    assert!(cli
        .ok(&["module", "config", "get", "web"])
        .contains("maxloop=\"6\""));
    wait_until(
        Duration::from_secs(20),
        "web runs its new package",
        || async {
            read_pid(&cluster, "web").is_some_and(|p| p != before_pid)
                && cli.state_code("web") == 2
                && serves(ports[0]).await
        },
    )
    .await;
    assert!(
        cli.ok(&["log", "-m", "web"]).matches("package ").count() >= 2,
        "two packages set up"
    );
    // Uninstalling a started module is refused.
    assert!(!cli.run(&["module", "uninstall", "web"]).status.success());

    // Phase 5: stop. STOP, exit code 0, the server is gone.
    cli.ok(&["stop", "-m", "web"]);
    wait_until(Duration::from_secs(20), "web is stopped", || async {
        cli.state_code("web") == 0
    })
    .await;
    assert!(!serves(ports[0]).await);
    cli.ok(&["stop", "-m", "api"]);
    wait_until(Duration::from_secs(20), "api is stopped", || async {
        cli.state_code("api") == 0
    })
    .await;
    cli.ok(&["module", "uninstall", "web"]);
    assert!(!cli.ok(&["module", "list"]).contains("web "));
    assert!(cluster.terminate("n1"));
}
