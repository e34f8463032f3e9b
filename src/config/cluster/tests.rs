use super::*;

fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
    ClusterConfig::parse("cluster.xml", text, Path::new("/etc/rampart"))
}

const THREE_NODES: &str = r#"<?xml version="1.0"?>
<cluster>
  <rampart secret_file="secret" heartbeat_ms="50" election_timeout_min_ms="300" election_timeout_max_ms="600"/>
  <lans>
    <lan name="default" command="on">
      <node name="n1" addr="127.0.0.1" raft_port="7001" api_port="7101" data_dir="/tmp/n1"/>
      <node name="n2" addr="127.0.0.1" raft_port="7002" api_port="7102" data_dir="n2"/>
      <node name="w" addr="127.0.0.1" raft_port="7003" api_port="7103" witness="on"/>
    </lan>
    <lan name="backup">
      <node name="n1" addr="198.18.1.1"/>
      <node name="n2" addr="198.18.1.2"/>
      <node name="w" addr="198.18.1.3"/>
    </lan>
  </lans>
</cluster>
"#;

#[test]
fn a_valid_file_gives_nodes_addresses_ports_and_paths() {
    let config = parse(THREE_NODES).unwrap();
    assert_eq!(config.lans, ["default", "backup"]);
    assert_eq!(config.nodes.len(), 3);
    let n2 = config.node("n2").unwrap();
    assert_eq!(n2.raft_addr(), "127.0.0.1:7002");
    assert_eq!(n2.api_addr(), "127.0.0.1:7102");
    assert_eq!(n2.data_dir, Path::new("/etc/rampart/n2"));
    assert_eq!(n2.addrs[1].to_string(), "198.18.1.2");
    assert!(config.node("w").unwrap().witness);
    assert_eq!(config.secret_file, Path::new("/etc/rampart/secret"));
    assert_eq!(config.timing.heartbeat_ms, 50);
    // SafeKit's `command` attribute is accepted with a warning that says why.
    assert_eq!(config.warnings.len(), 1);
    assert!(config.warnings[0].contains("'command'"));
}

#[test]
fn defaults_apply_to_a_minimal_safekit_file() {
    let config = parse(
        r#"<cluster><lans><lan name="default">
             <node name="a" addr="198.18.0.1"/><node name="b" addr="198.18.0.2"/>
           </lan></lans></cluster>"#,
    )
    .unwrap();
    let a = config.node("a").unwrap();
    assert_eq!(a.raft_addr(), format!("198.18.0.1:{DEFAULT_RAFT_PORT}"));
    assert_eq!(a.data_dir, Path::new(DEFAULT_DATA_DIR));
    assert_eq!(config.timing, RaftTiming::default());
}

/// Each invalid file: the expected line, column and a fragment of the message.
#[test]
fn invalid_files_are_rejected_with_position_and_reason() {
    let cases: &[(&str, u32, u32, &str)] = &[
        ("<cluster>\n  <lans>\n</cluster>", 3, 1, "malformed XML"),
        ("<clusters/>", 1, 1, "expected <cluster>"),
        ("<cluster>\n  <lanz/>\n</cluster>", 2, 3, "unknown element <lanz>"),
        ("<cluster/>", 1, 1, "needs a <lans>"),
        (
            "<cluster><lans>\n<lan name=\"x\">\n  <node name=\"a\" adr=\"1.2.3.4\"/></lan></lans></cluster>",
            3,
            3,
            "needs the attribute 'addr'",
        ),
        (
            "<cluster><lans><lan name=\"x\">\n <node name=\"a\" addr=\"1.2.3\"/></lan></lans></cluster>",
            2,
            2,
            "expected an IPv4 or IPv6 address",
        ),
        (
            "<cluster><lans><lan name=\"x\">\n <node name=\"a\" addr=\"1.2.3.4\" raft_port=\"70000\"/></lan></lans></cluster>",
            2,
            2,
            "expected a TCP port",
        ),
        (
            "<cluster><lans><lan name=\"x\">\n <node name=\"a\" addr=\"1.2.3.4\" colour=\"red\"/></lan></lans></cluster>",
            2,
            2,
            "unknown attribute 'colour'",
        ),
        (
            "<cluster><lans><lan name=\"x\">\n <node name=\"a\" addr=\"1.2.3.4\"/>\n <node name=\"a\" addr=\"1.2.3.5\"/></lan></lans></cluster>",
            3,
            2,
            "listed twice",
        ),
        (
            "<cluster><lans><lan name=\"x\">\n <node name=\"a\" addr=\"1.2.3.4\"/>\n <node name=\"b\" addr=\"1.2.3.4\"/></lan></lans></cluster>",
            1,
            16,
            "both use 1.2.3.4",
        ),
        (
            "<cluster>\n <rampart heartbeat_ms=\"400\"/><lans><lan name=\"x\"><node name=\"a\" addr=\"1.2.3.4\"/></lan></lans></cluster>",
            2,
            2,
            "at least 3 × heartbeat_ms",
        ),
        (
            "<cluster><lans><lan name=\"x\"><node name=\"a\" addr=\"1.2.3.4\"/></lan>\n<lan name=\"y\"><node name=\"z\" addr=\"1.2.3.5\"/></lan></lans></cluster>",
            2,
            15,
            "not in the first LAN",
        ),
        (
            "<cluster><lans><lan name=\"x\"><node name=\"a\" addr=\"1.2.3.4\"/><node name=\"b\" addr=\"1.2.3.5\"/></lan>\n<lan name=\"y\"><node name=\"a\" addr=\"1.2.3.6\"/></lan></lans></cluster>",
            2,
            1,
            "no address for node 'b'",
        ),
        (
            "<cluster><lans><lan name=\"x\">\n <node name=\"../etc\" addr=\"1.2.3.4\"/></lan></lans></cluster>",
            2,
            2,
            "invalid node name",
        ),
    ];
    for (text, line, column, fragment) in cases {
        let error = parse(text).expect_err(text);
        let pos = error
            .pos
            .unwrap_or_else(|| panic!("no position for {text}: {error}"));
        assert!(
            error.message.contains(fragment),
            "{text}\n→ {error}\nexpected: {fragment}"
        );
        assert_eq!(
            (pos.line, pos.column),
            (*line, *column),
            "{text}\n→ {error}"
        );
        assert!(error.to_string().starts_with("cluster.xml:"), "{error}");
    }
}

#[test]
fn local_node_is_found_by_name_or_by_local_address() {
    let config = parse(
        r#"<cluster><lans><lan name="l">
             <node name="here" addr="127.0.0.1"/><node name="far" addr="198.18.200.200"/>
           </lan></lans></cluster>"#,
    )
    .unwrap();
    assert_eq!(config.local_node(None).unwrap().name, "here");
    assert_eq!(config.local_node(Some("far")).unwrap().name, "far");
    assert!(config
        .local_node(Some("nope"))
        .unwrap_err()
        .contains("no node named 'nope'"));
}

#[test]
fn short_or_missing_secrets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"<cluster><rampart secret_file="s"/><lans><lan name="l"><node name="a" addr="127.0.0.1"/></lan></lans></cluster>"#;
    let config = ClusterConfig::parse("c.xml", text, dir.path()).unwrap();
    assert!(config.read_secret().unwrap_err().contains("cannot read"));
    std::fs::write(dir.path().join("s"), "short\n").unwrap();
    assert!(config.read_secret().unwrap_err().contains("at least 16"));
    std::fs::write(dir.path().join("s"), "0123456789abcdef0123\n").unwrap();
    assert_eq!(config.read_secret().unwrap(), b"0123456789abcdef0123");
}
