//! Reading `userconfig.xml` into [`UserConfig`]: macros first, then each section, then
//! the rules that depend on the module's mode.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use rampart_raft::command::ModuleKind;
use regex::Regex;

use super::*;
use crate::config::xml::{self, ConfigError, Element};
use crate::module::duration::{self, Unit};

/// Parses `text`; `file` names the source in errors and warnings.
pub fn parse(file: &str, text: &str) -> Result<UserConfig, ConfigError> {
    let mut root = xml::parse(file, text)?;
    if root.name != "safe" {
        return Err(root.error(format!(
            "the root element is <{}>: expected <safe>",
            root.name
        )));
    }
    root.check_attributes(&[], &[])?;
    root.check_children(&["macro", "service"])?;
    let mut macros = BTreeMap::new();
    collect_macros(&root, &mut macros)?;
    if let Some(service) = root.children.iter().find(|c| c.name == "service") {
        collect_macros(service, &mut macros)?;
    }
    expand(&mut root, &macros)?;
    let service = root
        .single_child("service")?
        .ok_or_else(|| root.error("<safe> needs a <service> element"))?;
    read_service(service)
}

fn collect_macros(
    parent: &Element,
    macros: &mut BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    for m in parent.children_named("macro") {
        m.check_attributes(&["name", "value"], &[])?;
        m.check_children(&[])?;
        let name = m.required("name")?;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(m.error(format!(
                "macro name '{name}' must be letters, digits and '_'"
            )));
        }
        if macros
            .insert(name.to_string(), m.required("value")?.to_string())
            .is_some()
        {
            return Err(m.error(format!("macro '{name}' is defined twice")));
        }
    }
    Ok(())
}

/// Replaces `%NAME%` in every attribute value and text; an unknown macro is an error.
fn expand(element: &mut Element, macros: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    if element.name != "macro" {
        let error_at = element.clone();
        let substitute = |value: &str| -> Result<String, ConfigError> {
            let mut out = String::new();
            let mut rest = value;
            while let Some(start) = rest.find('%') {
                out.push_str(&rest[..start]);
                let after = &rest[start + 1..];
                let Some(end) = after.find('%') else {
                    out.push_str(&rest[start..]);
                    return Ok(out);
                };
                let name = &after[..end];
                let replacement = macros.get(name).ok_or_else(|| {
                    error_at.error(format!(
                        "<{}> uses the undefined macro %{name}%",
                        error_at.name
                    ))
                })?;
                out.push_str(replacement);
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            Ok(out)
        };
        for attribute in &mut element.attributes {
            attribute.value = substitute(&attribute.value)?;
        }
        element.text = substitute(&element.text)?;
    }
    for child in &mut element.children {
        expand(child, macros)?;
    }
    Ok(())
}

fn parse_with<T>(
    e: &Element,
    name: &str,
    what: &str,
    f: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, ConfigError> {
    match e.attr(name) {
        None => Ok(None),
        Some(raw) => f(raw.trim()).map(Some).ok_or_else(|| {
            e.error(format!(
                "attribute '{name}' of <{}> is '{raw}': expected {what}",
                e.name
            ))
        }),
    }
}

fn time(e: &Element, name: &str, legacy: Unit, default: Duration) -> Result<Duration, ConfigError> {
    match e.attr(name) {
        None => Ok(default),
        Some(raw) => duration::parse(raw, legacy)
            .map_err(|m| e.error(format!("attribute '{name}' of <{}>: {m}", e.name))),
    }
}

fn action(e: &Element) -> Result<Action, ConfigError> {
    Ok(parse_with(
        e,
        "action",
        "restart, stopstart, stop or noaction",
        |v| match v {
            "restart" => Some(Action::Restart),
            "stopstart" => Some(Action::StopStart),
            "stop" => Some(Action::Stop),
            "noaction" => Some(Action::NoAction),
            _ => None,
        },
    )?
    .unwrap_or(Action::Restart))
}

fn when(e: &Element, name: &str) -> Result<When, ConfigError> {
    Ok(
        parse_with(e, name, "prim, both, second or pre", |v| match v {
            "prim" => Some(When::Prim),
            "both" => Some(When::Both),
            "second" | "sec" => Some(When::Second),
            "pre" => Some(When::Pre),
            _ => None,
        })?
        .unwrap_or(When::Prim),
    )
}

fn ip(e: &Element, name: &str) -> Result<IpAddr, ConfigError> {
    parse_with(e, name, "an IP address", |v| v.parse().ok())?
        .ok_or_else(|| e.error(format!("<{}> needs the attribute '{name}'", e.name)))
}

fn read_service(service: &Element) -> Result<UserConfig, ConfigError> {
    let mut warnings = service.check_attributes(
        &[
            "mode",
            "boot",
            "defaultprim",
            "failover",
            "maxloop",
            "loop_interval",
        ],
        &[],
    )?;
    service.check_children(&[
        "macro", "heart", "vip", "rfs", "farm", "user", "errd", "check", "failover",
    ])?;
    let mode = match service.required("mode")? {
        "mirror" => ModuleKind::Mirror,
        "farm" => ModuleKind::Farm,
        "light" => ModuleKind::Light,
        other => {
            return Err(service.error(format!(
                "mode '{other}' of <service>: expected mirror, farm or light"
            )))
        }
    };
    // Elements the mode forbids, before reading them.
    let forbid = |name: &str, why: &str| -> Result<(), ConfigError> {
        match service.children_named(name).next() {
            Some(e) => Err(e.error(format!(
                "<{name}> is not allowed in a {} module: {why}",
                mode_name(mode)
            ))),
            None => Ok(()),
        }
    };
    match mode {
        ModuleKind::Mirror => forbid("farm", "farm membership is for farm modules")?,
        ModuleKind::Farm => forbid("rfs", "a farm module replicates no files")?,
        ModuleKind::Light => {
            forbid("rfs", "a light module replicates no files")?;
            forbid("vip", "a light module has no virtual IP")?;
            forbid("farm", "farm membership is for farm modules")?;
        }
    }
    let single = |name: &str| service.single_child(name);
    let heart = single("heart")?.map(read_heart).transpose()?;
    let vip = match single("vip")? {
        Some(v) => Some(read_vip(v, mode, &mut warnings)?),
        None => None,
    };
    let rfs = match single("rfs")? {
        Some(r) => Some(read_rfs(r, &mut warnings)?),
        None => None,
    };
    let farm_lans = match single("farm")? {
        Some(farm) => {
            farm.check_attributes(&[], &[])?;
            farm.check_children(&["lan"])?;
            farm.children_named("lan")
                .map(|lan| {
                    lan.check_attributes(&["name"], &[])?;
                    Ok(lan.required("name")?.to_string())
                })
                .collect::<Result<Vec<_>, ConfigError>>()?
        }
        None => Vec::new(),
    };
    let user = match single("user")? {
        Some(u) => read_user(u, &mut warnings)?,
        None => User::default(),
    };
    let errd = single("errd")?.map(read_errd).transpose()?;
    let checks = match single("check")? {
        Some(c) => read_checks(c)?,
        None => Vec::new(),
    };
    let failover_rules = match single("failover")? {
        Some(f) => {
            f.check_attributes(&[], &[])?;
            warnings.push(format!(
                "{}:{}:{}: <failover> rules are kept but not evaluated yet: Rampart applies its built-in rules (a down checker or process triggers its action)",
                f.file, f.pos.line, f.pos.column
            ));
            Some(f.text.clone())
        }
        None => None,
    };

    if mode == ModuleKind::Mirror && rfs.as_ref().is_none_or(|r| r.replicated.is_empty()) {
        return Err(
            service.error("a mirror module needs <rfs> with at least one <replicated dir=…>")
        );
    }
    if service.attr("defaultprim").is_some() && mode != ModuleKind::Mirror {
        return Err(service.error("'defaultprim' of <service> only applies to mirror modules"));
    }
    Ok(UserConfig {
        mode,
        boot: service.flag("boot")?.unwrap_or(true),
        defaultprim: service.attr("defaultprim").map(str::to_string),
        failover: service.flag("failover")?.unwrap_or(true),
        maxloop: service.parsed("maxloop", "a whole number")?.unwrap_or(3),
        loop_interval: time(
            service,
            "loop_interval",
            Unit::Hours,
            Duration::from_secs(24 * 3600),
        )?,
        heart,
        vip,
        rfs,
        farm_lans,
        user,
        errd,
        checks,
        failover_rules,
        warnings,
    })
}

fn mode_name(mode: ModuleKind) -> &'static str {
    match mode {
        ModuleKind::Mirror => "mirror",
        ModuleKind::Farm => "farm",
        ModuleKind::Light => "light",
    }
}

fn read_heart(heart: &Element) -> Result<Heart, ConfigError> {
    heart.check_attributes(&["pulse", "timeout"], &[])?;
    heart.check_children(&["heartbeat"])?;
    let pulse = time(heart, "pulse", Unit::Millis, Duration::from_millis(700))?;
    let timeout = time(heart, "timeout", Unit::Millis, Duration::from_secs(30))?;
    if pulse.is_zero() || pulse >= timeout {
        return Err(heart.error(format!(
            "<heart> pulse ({pulse:?}) must be above zero and below timeout ({timeout:?})"
        )));
    }
    let mut lans = Vec::new();
    for beat in heart.children_named("heartbeat") {
        beat.check_attributes(&["name", "ident"], &[])?;
        beat.check_children(&[])?;
        lans.push(beat.required("name")?.to_string());
    }
    Ok(Heart {
        pulse,
        timeout,
        lans,
    })
}

fn read_vip(
    vip: &Element,
    mode: ModuleKind,
    warnings: &mut Vec<String>,
) -> Result<Vip, ConfigError> {
    vip.check_attributes(&[], &[])?;
    vip.check_children(&["interface_list", "loadbalancing_list"])?;
    let list = vip
        .single_child("interface_list")?
        .ok_or_else(|| vip.error("<vip> needs an <interface_list>"))?;
    list.check_attributes(&[], &[])?;
    list.check_children(&["interface"])?;
    let mut interfaces = Vec::new();
    for interface in list.children_named("interface") {
        warnings.extend(interface.check_attributes(
            &["check", "name"],
            &[(
                "arpreroute",
                "Rampart always announces a moved address with gratuitous ARP",
            )],
        )?);
        interface.check_children(&["real_interface", "virtual_interface"])?;
        if interface.children.len() != 1 {
            return Err(interface
                .error("<interface> needs exactly one <real_interface> or <virtual_interface>"));
        }
        let inner = &interface.children[0];
        let kind = if inner.name == "real_interface" {
            inner.check_attributes(&[], &[])?;
            if mode == ModuleKind::Farm {
                return Err(inner.error(
                    "a farm module's address is on a <virtual_interface type=\"vmac_invisible\">",
                ));
            }
            VipKind::Real
        } else {
            inner.check_attributes(&["type"], &[])?;
            match inner.required("type")? {
                "vmac_invisible" => {}
                other => {
                    return Err(inner.error(format!(
                        "virtual interface type '{other}' is not supported: Rampart implements vmac_invisible"
                    )))
                }
            }
            if mode != ModuleKind::Farm {
                return Err(inner.error("<virtual_interface> is for farm modules"));
            }
            VipKind::VmacInvisible
        };
        inner.check_children(&["virtual_addr"])?;
        let mut addrs = Vec::new();
        for addr in inner.children_named("virtual_addr") {
            addr.check_attributes(&["addr", "where", "check"], &[])?;
            addr.check_children(&[])?;
            let expected = if mode == ModuleKind::Farm {
                "alias"
            } else {
                "one_side_alias"
            };
            if let Some(place) = addr.attr("where") {
                if place != expected {
                    return Err(addr.error(format!(
                        "where=\"{place}\" in a {} module: expected where=\"{expected}\"",
                        mode_name(mode)
                    )));
                }
            }
            addrs.push(ip(addr, "addr")?);
        }
        if addrs.is_empty() {
            return Err(inner.error(format!(
                "<{}> needs at least one <virtual_addr addr=…>",
                inner.name
            )));
        }
        interfaces.push(VipInterface {
            kind,
            name: interface.attr("name").map(str::to_string),
            check: interface.flag("check")?.unwrap_or(true),
            addrs,
        });
    }
    let mut groups = Vec::new();
    if let Some(lb) = vip.single_child("loadbalancing_list")? {
        if mode != ModuleKind::Farm {
            return Err(lb.error("<loadbalancing_list> is for farm modules"));
        }
        lb.check_attributes(&[], &[])?;
        lb.check_children(&["group"])?;
        for group in lb.children_named("group") {
            groups.push(read_group(group)?);
        }
    }
    Ok(Vip { interfaces, groups })
}

fn read_group(group: &Element) -> Result<LoadBalancingGroup, ConfigError> {
    group.check_attributes(&["name"], &[])?;
    group.check_children(&["cluster", "rule"])?;
    let mut hosts = Vec::new();
    for cluster in group.children_named("cluster") {
        cluster.check_attributes(&[], &[])?;
        cluster.check_children(&["host"])?;
        for host in cluster.children_named("host") {
            host.check_attributes(&["name", "power"], &[])?;
            let power: u32 = host
                .parsed("power", "a whole number from 1 to 100")?
                .unwrap_or(1);
            if !(1..=100).contains(&power) {
                return Err(host.error("power of <host> must be from 1 to 100"));
            }
            hosts.push((host.required("name")?.to_string(), power));
        }
    }
    let mut rules = Vec::new();
    for rule in group.children_named("rule") {
        rule.check_attributes(&["port", "proto", "filter"], &[])?;
        rule.check_children(&[])?;
        let port: u16 = rule
            .parsed("port", "a TCP or UDP port")?
            .ok_or_else(|| rule.error("<rule> needs the attribute 'port'"))?;
        let proto = parse_with(rule, "proto", "tcp or udp", |v| match v {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            _ => None,
        })?
        .unwrap_or(Proto::Tcp);
        let filter = parse_with(rule, "filter", "on_addr, on_port or on_ipid", |v| match v {
            "on_addr" => Some(BalanceOn::Addr),
            "on_port" => Some(BalanceOn::Port),
            "on_ipid" => Some(BalanceOn::IpId),
            _ => None,
        })?
        .unwrap_or(BalanceOn::Addr);
        rules.push(LoadBalancingRule {
            port,
            proto,
            filter,
        });
    }
    if rules.is_empty() {
        return Err(group.error("<group> needs at least one <rule port=…>"));
    }
    Ok(LoadBalancingGroup {
        name: group.required("name")?.to_string(),
        hosts,
        rules,
    })
}

fn read_rfs(rfs: &Element, warnings: &mut Vec<String>) -> Result<Rfs, ConfigError> {
    warnings.extend(rfs.check_attributes(
        &["sync", "zone_size"],
        &[
            ("mountover", "Rampart always mounts its replication layer over the directory itself"),
            ("async", "SECOND's disk writes follow <rfs sync=…> (write: acknowledged on receipt; durable: on SECOND's disk)"),
            ("acl", "ACLs are replicated as extended attributes"),
            ("locktimeout", "replication takes no file locks"),
            ("nbrei", "reintegration copies only changed zones, from its bookkeeping"),
            ("nbremconn", "each module has one ordered replication stream"),
        ],
    )?);
    rfs.check_children(&["replicated"])?;
    let sync = parse_with(rfs, "sync", "write, durable or fsync", |v| match v {
        "write" => Some(SyncMode::Write),
        "durable" => Some(SyncMode::Durable),
        "fsync" => Some(SyncMode::Fsync),
        _ => None,
    })?
    .unwrap_or(SyncMode::Write);
    let zone_size = parse_with(
        rfs,
        "zone_size",
        "a power of two from 4K to 64M (bytes, or with K or M)",
        |v| {
            let (digits, scale) = match v.strip_suffix(['K', 'k']) {
                Some(d) => (d, 1 << 10),
                None => match v.strip_suffix(['M', 'm']) {
                    Some(d) => (d, 1 << 20),
                    None => (v, 1),
                },
            };
            let size = digits.parse::<u64>().ok()?.checked_mul(scale)?;
            (size.is_power_of_two() && (4 << 10..=64 << 20).contains(&size)).then_some(size)
        },
    )?
    .unwrap_or(1 << 20);
    let mut replicated: Vec<Replicated> = Vec::new();
    for dir in rfs.children_named("replicated") {
        dir.check_attributes(&["dir", "mode"], &[])?;
        dir.check_children(&["notreplicated"])?;
        if let Some(mode) = dir.attr("mode") {
            if mode != "read_only" {
                return Err(dir.error(format!(
                    "mode=\"{mode}\" of <replicated>: only read_only (the SECOND copy is always read-only)"
                )));
            }
        }
        let path = normal_path(dir.required("dir")?, true).ok_or_else(|| {
            dir.error("'dir' of <replicated> must be an absolute path without '..'")
        })?;
        if path == "/" {
            return Err(dir.error("the root directory cannot be replicated"));
        }
        if let Some(other) = replicated
            .iter()
            .find(|r| nested(&r.dir, &path) || nested(&path, &r.dir))
        {
            return Err(dir.error(format!(
                "{path} overlaps the replicated directory {}",
                other.dir
            )));
        }
        let mut notreplicated = Vec::new();
        for skip in dir.children_named("notreplicated") {
            skip.check_attributes(&["path"], &[])?;
            skip.check_children(&[])?;
            let relative = normal_path(skip.required("path")?, false).ok_or_else(|| {
                skip.error("'path' of <notreplicated> must be relative to the replicated directory, without '..'")
            })?;
            notreplicated.push(relative);
        }
        replicated.push(Replicated {
            dir: path,
            notreplicated,
        });
    }
    Ok(Rfs {
        sync,
        zone_size,
        replicated,
    })
}

/// `path` without `.`, empty parts and trailing `/`; `None` when it has `..` or is not
/// absolute (relative) as asked.
fn normal_path(path: &str, absolute: bool) -> Option<String> {
    if path.starts_with('/') != absolute {
        return None;
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    if !absolute && parts.is_empty() {
        return None;
    }
    let joined = parts.join("/");
    Some(if absolute {
        format!("/{joined}")
    } else {
        joined
    })
}

fn nested(outer: &str, inner: &str) -> bool {
    inner == outer || inner.starts_with(&format!("{outer}/"))
}

fn read_user(user: &Element, warnings: &mut Vec<String>) -> Result<User, ConfigError> {
    warnings.extend(user.check_attributes(
        &["nicestoptimeout", "forcestoptimeout"],
        &[
            ("logging", "script output always goes to the module log"),
            ("userlog", "script output always goes to the module log"),
        ],
    )?);
    user.check_children(&["var"])?;
    let defaults = User::default();
    let mut vars: Vec<(String, String)> = Vec::new();
    for var in user.children_named("var") {
        var.check_attributes(&["name", "value"], &[])?;
        var.check_children(&[])?;
        let name = var.required("name")?;
        let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(var.error(format!("'{name}' is not a valid environment variable name")));
        }
        if vars.iter().any(|(n, _)| n == name) {
            return Err(var.error(format!("variable '{name}' is defined twice")));
        }
        vars.push((name.to_string(), var.required("value")?.to_string()));
    }
    Ok(User {
        nicestoptimeout: time(
            user,
            "nicestoptimeout",
            Unit::Seconds,
            defaults.nicestoptimeout,
        )?,
        forcestoptimeout: time(
            user,
            "forcestoptimeout",
            Unit::Seconds,
            defaults.forcestoptimeout,
        )?,
        vars,
    })
}

fn regex_attr(e: &Element, name: &str) -> Result<Option<Regex>, ConfigError> {
    e.attr(name)
        .map(|raw| {
            Regex::new(raw).map_err(|err| {
                e.error(format!(
                    "attribute '{name}' of <{}> is not a valid regex: {err}",
                    e.name
                ))
            })
        })
        .transpose()
}

fn read_errd(errd: &Element) -> Result<Errd, ConfigError> {
    errd.check_attributes(&["polltimer"], &[])?;
    errd.check_children(&["proc"])?;
    let mut procs: Vec<Proc> = Vec::new();
    for p in errd.children_named("proc") {
        p.check_attributes(
            &[
                "name",
                "nameregex",
                "argregex",
                "atleast",
                "atmax",
                "class",
                "action",
            ],
            &[],
        )?;
        p.check_children(&[])?;
        let name = p.required("name")?.to_string();
        if procs.iter().any(|q| q.name == name) {
            return Err(p.error(format!(
                "process '{name}' is monitored twice: resource proc.{name} must be unique"
            )));
        }
        let matcher = match regex_attr(p, "nameregex")? {
            Some(regex) => ProcMatch::NameRegex(regex),
            None => ProcMatch::Name(name.clone()),
        };
        let atleast: u32 = p.parsed("atleast", "a whole number")?.unwrap_or(1);
        let atmax = match p.attr("atmax") {
            None | Some("none") => None,
            Some(_) => p.parsed("atmax", "a whole number or none")?,
        };
        if atmax.is_some_and(|max| max < atleast) {
            return Err(p.error("atmax of <proc> is below atleast"));
        }
        procs.push(Proc {
            name,
            matcher,
            argregex: regex_attr(p, "argregex")?,
            atleast,
            atmax,
            class: when(p, "class")?,
            action: action(p)?,
        });
    }
    Ok(Errd {
        polltimer: time(errd, "polltimer", Unit::Seconds, Duration::from_secs(10))?,
        procs,
    })
}

fn read_checks(check: &Element) -> Result<Vec<Check>, ConfigError> {
    check.check_attributes(&[], &[])?;
    check.check_children(&["tcp", "ping", "intf", "ip", "custom", "module"])?;
    let mut checks: Vec<Check> = Vec::new();
    let mut resources = BTreeSet::new();
    for c in &check.children {
        let with_to = ["tcp", "ping", "intf", "ip"].contains(&c.name.as_str());
        let own_timing = ["custom", "module"].contains(&c.name.as_str());
        let mut known = vec!["ident", "when", "action"];
        if own_timing {
            known.extend(["interval", "timeout"]);
        }
        if c.name == "custom" {
            known.extend(["exec", "arg"]);
        }
        if c.name == "module" {
            known = vec!["name", "when", "action", "interval", "timeout"];
        }
        c.check_attributes(&known, &[])?;
        c.check_children(if with_to { &["to"] } else { &[] })?;
        let to = if with_to {
            let to = c
                .single_child("to")?
                .ok_or_else(|| c.error(format!("<{}> needs a <to …/> element", c.name)))?;
            to.check_children(&[])?;
            Some(to)
        } else {
            None
        };
        let timing = to.unwrap_or(c);
        let ident = if c.name == "module" {
            c.required("name")?
        } else {
            c.required("ident")?
        };
        let probe = match c.name.as_str() {
            "tcp" => {
                let to = to.expect("tcp has <to>");
                to.check_attributes(&["addr", "port", "interval", "timeout"], &[])?;
                Probe::Tcp {
                    addr: ip(to, "addr")?,
                    port: to
                        .parsed("port", "a TCP port")?
                        .ok_or_else(|| to.error("<to> needs the attribute 'port'"))?,
                }
            }
            "ping" | "ip" => {
                let to = to.expect("has <to>");
                to.check_attributes(&["addr", "interval", "timeout"], &[])?;
                let addr = ip(to, "addr")?;
                if c.name == "ping" {
                    Probe::Ping { addr }
                } else {
                    Probe::Ip { addr }
                }
            }
            "intf" => {
                let to = to.expect("intf has <to>");
                to.check_attributes(&["interface", "local_addr", "interval", "timeout"], &[])?;
                let interface = to.attr("interface").map(str::to_string);
                let addr = parse_with(to, "local_addr", "an IP address", |v| v.parse().ok())?;
                if interface.is_none() && addr.is_none() {
                    return Err(to.error("<to> of <intf> needs 'interface' or 'local_addr'"));
                }
                Probe::Intf { interface, addr }
            }
            "custom" => Probe::Custom {
                exec: c.required("exec")?.to_string(),
                args: c
                    .attr("arg")
                    .map(|a| a.split_whitespace().map(str::to_string).collect())
                    .unwrap_or_default(),
            },
            _ => Probe::Module {
                name: ident.to_string(),
            },
        };
        let resource = format!("{}.{ident}", c.name);
        if !resources.insert(resource.clone()) {
            return Err(c.error(format!("resource {resource} is defined twice")));
        }
        let interval = time(timing, "interval", Unit::Seconds, Duration::from_secs(10))?;
        let timeout = time(timing, "timeout", Unit::Seconds, Duration::from_secs(5))?;
        if interval.is_zero() || timeout.is_zero() {
            return Err(timing.error("interval and timeout must be above zero"));
        }
        checks.push(Check {
            resource,
            probe,
            when: when(c, "when")?,
            interval,
            timeout,
            action: action(c)?,
        });
    }
    Ok(checks)
}
