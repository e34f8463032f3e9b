use std::time::Duration;

use rampart_raft::command::ModuleKind;

use super::*;

fn parse_ok(text: &str) -> UserConfig {
    parse("userconfig.xml", text).unwrap_or_else(|e| panic!("{e}"))
}

/// A SafeKit 8.2 mirror module for PostgreSQL, as SafeKit's documentation writes it.
const SAFEKIT_MIRROR: &str = r#"<!DOCTYPE safe>
<safe>
<service mode="mirror" defaultprim="node1" maxloop="3" loop_interval="24" failover="on">
  <!-- Heartbeat Configuration -->
  <heart pulse="700" timeout="30000">
    <heartbeat name="default" ident="flow"/>
  </heart>
  <!-- Virtual IP Configuration -->
  <vip>
    <interface_list>
      <interface check="on" arpreroute="on">
        <real_interface>
          <virtual_addr addr="%VIRTUAL_IP%" where="one_side_alias"/>
        </real_interface>
      </interface>
    </interface_list>
  </vip>
  <macro name="VIRTUAL_IP" value="198.18.0.99"/>
  <!-- Software Error Detection Configuration -->
  <errd polltimer="10">
    <proc name="postgres" atleast="1" action="restart" class="prim"/>
  </errd>
  <!-- File Replication Configuration -->
  <rfs mountover="off" async="second" acl="off" nbrei="3">
    <replicated dir="/var/lib/postgresql/15/main/" mode="read_only">
      <notreplicated path="pg_stat_tmp"/>
    </replicated>
  </rfs>
  <!-- User scripts -->
  <user nicestoptimeout="300" forcestoptimeout="300" logging="userlog">
    <var name="PGPORT" value="5432"/>
  </user>
  <check>
    <tcp ident="postgres" when="prim">
      <to addr="127.0.0.1" port="5432" interval="10" timeout="5"/>
    </tcp>
  </check>
</service>
</safe>
"#;

/// A SafeKit farm module for a web server.
const SAFEKIT_FARM: &str = r#"<safe>
<service mode="farm" maxloop="3" loop_interval="24">
  <farm>
    <lan name="default"/>
  </farm>
  <vip>
    <interface_list>
      <interface check="on" arpreroute="on">
        <virtual_interface type="vmac_invisible">
          <virtual_addr addr="198.18.0.80" where="alias"/>
        </virtual_interface>
      </interface>
    </interface_list>
    <loadbalancing_list>
      <group name="web">
        <cluster>
          <host name="node1" power="1"/>
          <host name="node2" power="2"/>
        </cluster>
        <rule port="80" proto="tcp" filter="on_addr"/>
      </group>
    </loadbalancing_list>
  </vip>
  <errd polltimer="10">
    <proc name="nginx" atleast="1" action="restart" class="both" argregex="master process.*"/>
  </errd>
  <check>
    <tcp ident="http" when="both"><to addr="127.0.0.1" port="80" interval="5" timeout="2"/></tcp>
  </check>
</service>
</safe>
"#;

#[test]
fn a_safekit_mirror_module_loads_with_warnings_for_meaningless_tuning() {
    let config = parse_ok(SAFEKIT_MIRROR);
    assert_eq!(config.mode, ModuleKind::Mirror);
    assert_eq!(config.defaultprim.as_deref(), Some("node1"));
    assert_eq!(config.loop_interval, Duration::from_secs(24 * 3600));
    let heart = config.heart.as_ref().unwrap();
    assert_eq!(
        (heart.pulse, heart.timeout),
        (Duration::from_millis(700), Duration::from_secs(30))
    );
    assert_eq!(heart.lans, ["default"]);
    let vip = config.vip.as_ref().unwrap();
    assert_eq!(
        vip.interfaces[0].addrs[0].to_string(),
        "198.18.0.99",
        "macro expanded"
    );
    let rfs = config.rfs.as_ref().unwrap();
    assert_eq!(rfs.replicated[0].dir, "/var/lib/postgresql/15/main");
    assert_eq!(rfs.replicated[0].notreplicated, ["pg_stat_tmp"]);
    assert_eq!(rfs.sync, SyncMode::Write);
    assert_eq!(
        config.user.vars,
        [("PGPORT".to_string(), "5432".to_string())]
    );
    assert_eq!(config.checks[0].resource, "tcp.postgres");
    assert_eq!(config.checks[0].interval, Duration::from_secs(10));
    assert_eq!(config.errd.as_ref().unwrap().procs[0].name, "postgres");
    // Each ignored SafeKit setting is named, with the reason.
    let ignored: Vec<&str> = [
        "arpreroute",
        "mountover",
        "async",
        "acl",
        "nbrei",
        "logging",
    ]
    .to_vec();
    for name in ignored {
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.contains(&format!("'{name}'")) && w.contains("ignored:")),
            "no warning for {name}: {:?}",
            config.warnings
        );
    }
}

#[test]
fn a_safekit_farm_module_loads() {
    let config = parse_ok(SAFEKIT_FARM);
    assert_eq!(config.mode, ModuleKind::Farm);
    assert_eq!(config.farm_lans, ["default"]);
    let vip = config.vip.unwrap();
    assert_eq!(vip.interfaces[0].kind, VipKind::VmacInvisible);
    let group = &vip.groups[0];
    assert_eq!(
        group.hosts,
        [("node1".to_string(), 1), ("node2".to_string(), 2)]
    );
    assert_eq!(
        group.rules[0],
        LoadBalancingRule {
            port: 80,
            proto: Proto::Tcp,
            filter: BalanceOn::Addr
        }
    );
    let proc = &config.errd.unwrap().procs[0];
    assert_eq!(proc.class, When::Both);
    assert!(proc
        .argregex
        .as_ref()
        .unwrap()
        .is_match("nginx: master process /usr/sbin/nginx"));
}

#[test]
fn a_light_module_with_units_and_checkers() {
    let config = parse_ok(
        r#"<safe><service mode="light" maxloop="5" loop_interval="30m">
             <user nicestoptimeout="20s" forcestoptimeout="5000ms"/>
             <errd polltimer="500ms"><proc name="web" nameregex="^python3?$" argregex="http\.server" atleast="1" atmax="2" action="stopstart"/></errd>
             <check>
               <custom ident="probe" exec="check.sh" arg="--quick -v" interval="2s" timeout="1s" action="stop"/>
               <ping ident="gw" when="both"><to addr="198.18.0.254"/></ping>
               <intf ident="lan" when="both"><to interface="eth0"/></intf>
               <ip ident="addr"><to addr="198.18.0.10"/></ip>
               <module name="db" action="noaction"/>
             </check>
           </service></safe>"#,
    );
    assert_eq!(config.loop_interval, Duration::from_secs(1800));
    assert_eq!(config.user.nicestoptimeout, Duration::from_secs(20));
    assert_eq!(config.user.forcestoptimeout, Duration::from_secs(5));
    let errd = config.errd.unwrap();
    assert_eq!(errd.polltimer, Duration::from_millis(500));
    assert_eq!(errd.procs[0].atmax, Some(2));
    assert_eq!(errd.procs[0].action, Action::StopStart);
    let resources: Vec<&str> = config.checks.iter().map(|c| c.resource.as_str()).collect();
    assert_eq!(
        resources,
        [
            "custom.probe",
            "ping.gw",
            "intf.lan",
            "ip.addr",
            "module.db"
        ]
    );
    assert_eq!(
        config.checks[0].probe,
        Probe::Custom {
            exec: "check.sh".into(),
            args: vec!["--quick".into(), "-v".into()]
        }
    );
    assert_eq!(config.checks[0].action, Action::Stop);
    assert_eq!(config.checks[4].action, Action::NoAction);
}

#[test]
fn boot_off_is_flagged_as_not_honoured_yet() {
    let config = parse_ok("<safe><service mode=\"light\" boot=\"off\"/></safe>");
    assert!(config.warnings.iter().any(|w| w.contains("boot=\"off\"")));
    assert!(
        parse_ok("<safe><service mode=\"light\" boot=\"on\"/></safe>")
            .warnings
            .is_empty()
    );
}

#[test]
fn failover_rules_are_kept_and_flagged_as_not_evaluated() {
    let config = parse_ok(
        "<safe><service mode=\"light\"><failover><![CDATA[\n  c_tcp: if (tcp.* == down) then restart();\n]]></failover></service></safe>",
    );
    assert!(config.failover_rules.unwrap().contains("restart()"));
    assert!(config
        .warnings
        .iter()
        .any(|w| w.contains("not evaluated yet")));
}

/// Each invalid file: line, column, and a fragment of the message.
#[test]
fn invalid_files_are_rejected_naming_line_column_and_element() {
    let light = |body: &str| format!("<safe><service mode=\"light\">\n{body}\n</service></safe>");
    let mirror = |body: &str| {
        format!("<safe><service mode=\"mirror\">\n<rfs><replicated dir=\"/srv/data\"/></rfs>\n{body}\n</service></safe>")
    };
    let cases: Vec<(String, u32, u32, &str)> = vec![
        ("<safe><service mode=\"light\">".into(), 1, 7, "never closed"),
        ("<module/>".into(), 1, 1, "expected <safe>"),
        ("<safe/>".into(), 1, 1, "needs a <service>"),
        ("<safe><service mode=\"cluster\"/></safe>".into(), 1, 7, "mode 'cluster'"),
        (light("<hearts/>"), 2, 1, "unknown element <hearts> in <service>"),
        (light("<user colour=\"red\"/>"), 2, 1, "unknown attribute 'colour' in <user>"),
        (light("<user nicestoptimeout=\"5 days\"/>"), 2, 1, "unknown unit"),
        (light("<errd><proc name=\"x\" nameregex=\"(\"/></errd>"), 2, 7, "not a valid regex"),
        (light("<errd><proc name=\"x\" atleast=\"3\" atmax=\"1\"/></errd>"), 2, 7, "atmax of <proc> is below atleast"),
        (light("<errd><proc name=\"x\"/><proc name=\"x\"/></errd>"), 2, 23, "monitored twice"),
        (light("<errd><proc name=\"x\" action=\"reboot\"/></errd>"), 2, 7, "expected restart, stopstart, stop or noaction"),
        (light("<check><tcp ident=\"a\"/></check>"), 2, 8, "needs a <to …/>"),
        (light("<check><tcp ident=\"a\"><to addr=\"1.2.3.4\"/></tcp></check>"), 2, 23, "needs the attribute 'port'"),
        (light("<check><ping ident=\"a\"><to addr=\"host\"/></ping></check>"), 2, 24, "expected an IP address"),
        (light("<check><ip ident=\"a\"><to addr=\"1.2.3.4\"/></ip><ip ident=\"a\"><to addr=\"1.2.3.5\"/></ip></check>"), 2, 47, "defined twice"),
        (light("<vip/>"), 2, 1, "<vip> is not allowed in a light module"),
        (light("<rfs/>"), 2, 1, "<rfs> is not allowed in a light module"),
        (light("<user><var name=\"1X\" value=\"\"/></user>"), 2, 7, "not a valid environment variable name"),
        (light("<user><var name=\"X\" value=\"%NOPE%\"/></user>"), 2, 7, "undefined macro %NOPE%"),
        ("<safe><service mode=\"mirror\"/></safe>".into(), 1, 7, "needs <rfs>"),
        (mirror("<heart pulse=\"5s\" timeout=\"1s\"/>"), 3, 1, "must be above zero and below timeout"),
        ("<safe><service mode=\"mirror\"><rfs><replicated dir=\"data\"/></rfs></service></safe>".into(), 1, 35, "absolute path"),
        ("<safe><service mode=\"mirror\"><rfs><replicated dir=\"/a/../etc\"/></rfs></service></safe>".into(), 1, 35, "without '..'"),
        ("<safe><service mode=\"mirror\"><rfs>\n<replicated dir=\"/srv\"/>\n<replicated dir=\"/srv/db\"/></rfs></service></safe>".into(), 3, 1, "overlaps"),
        ("<safe><service mode=\"mirror\"><rfs><replicated dir=\"/srv\"><notreplicated path=\"../x\"/></replicated></rfs></service></safe>".into(), 1, 58, "relative to the replicated directory"),
        ("<safe><service mode=\"mirror\"><rfs sync=\"eventually\"><replicated dir=\"/srv\"/></rfs></service></safe>".into(), 1, 30, "write, durable or fsync"),
        ("<safe><service mode=\"mirror\"><rfs zone_size=\"3000\"><replicated dir=\"/srv\"/></rfs></service></safe>".into(), 1, 30, "power of two"),
        (mirror("<vip><interface_list><interface><virtual_interface type=\"vmac_invisible\"><virtual_addr addr=\"1.2.3.4\"/></virtual_interface></interface></interface_list></vip>"), 3, 33, "for farm modules"),
        (mirror("<vip><interface_list><interface><real_interface><virtual_addr addr=\"1.2.3.4\" where=\"alias\"/></real_interface></interface></interface_list></vip>"), 3, 49, "expected where=\"one_side_alias\""),
        ("<safe><service mode=\"farm\"><vip><interface_list><interface><virtual_interface type=\"vmac_directed\"><virtual_addr addr=\"1.2.3.4\"/></virtual_interface></interface></interface_list></vip></service></safe>".into(), 1, 60, "'vmac_directed' is not supported"),
        ("<safe><service mode=\"farm\"><rfs/></service></safe>".into(), 1, 28, "not allowed in a farm module"),
        ("<safe><service mode=\"light\" defaultprim=\"n1\"/></safe>".into(), 1, 7, "only applies to mirror"),
    ];
    for (text, line, column, fragment) in cases {
        let error = match parse("userconfig.xml", &text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e,
        };
        let pos = error.pos.unwrap_or_else(|| panic!("no position: {error}"));
        assert!(
            error.message.contains(fragment),
            "{text}\n→ {error}\nexpected: {fragment}"
        );
        assert_eq!((pos.line, pos.column), (line, column), "{text}\n→ {error}");
        assert!(error.to_string().starts_with("userconfig.xml:"), "{error}");
    }
}
