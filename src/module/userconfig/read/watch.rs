//! `<errd>` and `<check>`: what is watched, and what to do when it fails.

use std::collections::BTreeSet;
use std::time::Duration;

use regex::Regex;

use super::*;
use super::{action, ip, parse_with, time, when};
use crate::config::xml::{ConfigError, Element};
use crate::module::duration::Unit;

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

pub(super) fn read_errd(errd: &Element) -> Result<Errd, ConfigError> {
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

pub(super) fn read_checks(check: &Element) -> Result<Vec<Check>, ConfigError> {
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
