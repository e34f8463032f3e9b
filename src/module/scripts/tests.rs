use std::os::unix::fs::PermissionsExt;

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    env: ScriptEnv,
    log: Arc<ModuleLog>,
}

fn fixture(scripts: &[(&str, &str)]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let module_dir = dir.path().join("web");
    std::fs::create_dir_all(module_dir.join("bin")).unwrap();
    for (name, body) in scripts {
        let path = module_dir.join("bin").join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let log = Arc::new(ModuleLog::open(&dir.path().join("web.log")).unwrap());
    let env = ScriptEnv {
        module: "web".into(),
        module_dir,
        var_dir: dir.path().join("var"),
        vars: vec![("PORT".into(), "8080".into())],
    };
    Fixture {
        _dir: dir,
        env,
        log,
    }
}

fn messages(log: &ModuleLog, source: &str) -> Vec<String> {
    let (entries, _) = log.read(0, 1000, true).unwrap();
    entries
        .into_iter()
        .filter(|e| e.source == source)
        .map(|e| e.message)
        .collect()
}

const START: Transition = Transition {
    current: "STOP",
    next: "ALONE",
    action: "start",
};

#[tokio::test]
async fn a_script_gets_its_arguments_and_environment_and_its_output_is_logged() {
    let f = fixture(&[(
        "start_prim",
        "echo \"args $1 $2 $3\"; echo \"env $RAMPART_MODULE $SAFEMODULE $PORT\"; echo oops >&2",
    )]);
    let outcome = run(&f.env, &f.log, "start_prim", START, Duration::from_secs(10)).await;
    assert_eq!(outcome, ScriptOutcome::Succeeded);
    tokio::time::sleep(Duration::from_millis(100)).await; // output readers finish
    let lines = messages(&f.log, "start_prim");
    assert!(
        lines.contains(&"args STOP ALONE start".to_string()),
        "{lines:?}"
    );
    assert!(lines.contains(&"env web web 8080".to_string()), "{lines:?}");
    assert!(lines.contains(&"oops".to_string()), "{lines:?}");
    assert!(lines.contains(&"succeeded".to_string()), "{lines:?}");
}

#[tokio::test]
async fn exit_codes_and_missing_scripts() {
    let f = fixture(&[("prestart", "exit 3")]);
    let failed = run(&f.env, &f.log, "prestart", START, Duration::from_secs(10)).await;
    assert_eq!(failed, ScriptOutcome::Failed(Some(3)));
    assert!(!failed.ok());
    let missing = run(&f.env, &f.log, "start_both", START, Duration::from_secs(10)).await;
    assert_eq!(missing, ScriptOutcome::Missing);
    assert!(missing.ok());
}

#[tokio::test]
async fn a_script_past_its_timeout_is_killed_with_its_whole_process_group() {
    // The script starts a child that would outlive it, records its pid, and hangs.
    let f = fixture(&[(
        "start_prim",
        "sleep 1000 & echo $! > \"$RAMPART_MODULE_DIR/child.pid\"; sleep 1000",
    )]);
    let started = std::time::Instant::now();
    let outcome = run(
        &f.env,
        &f.log,
        "start_prim",
        START,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(outcome, ScriptOutcome::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(5));
    let pid: i32 = std::fs::read_to_string(f.env.module_dir.join("child.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The grandchild is gone too (allow the kernel a moment to reap it).
    let mut alive = true;
    for _ in 0..50 {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie awaiting its reaper.
        alive = !(state.is_empty() || state.contains(") Z "));
        if !alive {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive, "the script's child {pid} survived the timeout");
    assert!(messages(&f.log, "start_prim")
        .iter()
        .any(|m| m.contains("timed out")));
}

#[tokio::test]
async fn a_stop_that_hangs_is_run_again_with_force() {
    // Graceful stop hangs; the forced stop succeeds.
    let f = fixture(&[(
        "stop_prim",
        "if [ \"$3\" = force ]; then echo forced; exit 0; fi; sleep 1000",
    )]);
    let user = User {
        nicestoptimeout: Duration::from_millis(300),
        forcestoptimeout: Duration::from_secs(5),
        vars: Vec::new(),
    };
    let outcome = run_stop(&f.env, &f.log, "stop_prim", "PRIM", "STOP", &user).await;
    assert_eq!(outcome, ScriptOutcome::Succeeded);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lines = messages(&f.log, "stop_prim");
    let runs: Vec<&String> = lines.iter().filter(|l| l.starts_with("run ")).collect();
    assert_eq!(
        runs,
        ["run PRIM STOP stop", "run PRIM STOP force"],
        "{lines:?}"
    );
    assert!(lines.contains(&"forced".to_string()));
}

#[tokio::test]
async fn a_graceful_stop_that_works_is_not_forced() {
    let f = fixture(&[("stop_prim", "exit 0")]);
    let outcome = run_stop(
        &f.env,
        &f.log,
        "stop_prim",
        "PRIM",
        "STOP",
        &User::default(),
    )
    .await;
    assert_eq!(outcome, ScriptOutcome::Succeeded);
    let runs: Vec<String> = messages(&f.log, "stop_prim")
        .into_iter()
        .filter(|l| l.starts_with("run "))
        .collect();
    assert_eq!(runs, ["run PRIM STOP stop"]);
}
