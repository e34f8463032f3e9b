//! Reading `userconfig.xml` into [`UserConfig`]: macros first, then the elements the
//! mode forbids, then each section ([`vip`], [`rfs`], [`watch`] for errd and checks,
//! heart and user here), then the rules that need several sections.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use rampart_raft::command::ModuleKind;

mod rfs;
mod vip;
mod watch;

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
    if service.flag("boot")? == Some(false) {
        warnings.push(format!(
            "{}:{}:{}: boot=\"off\" of <service> has no effect yet: a module started on a node starts again when its node agent starts",
            service.file, service.pos.line, service.pos.column
        ));
    }
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
        Some(v) => Some(vip::read_vip(v, mode, &mut warnings)?),
        None => None,
    };
    let rfs = match single("rfs")? {
        Some(r) => Some(rfs::read_rfs(r, &mut warnings)?),
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
    let errd = single("errd")?.map(watch::read_errd).transpose()?;
    let checks = match single("check")? {
        Some(c) => watch::read_checks(c)?,
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
