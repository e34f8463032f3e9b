//! `<vip>`: virtual addresses and, for farms, load-balancing groups.

use rampart_raft::command::ModuleKind;

use super::*;
use super::{ip, mode_name, parse_with};
use crate::config::xml::{ConfigError, Element};

pub(super) fn read_vip(
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

pub(super) fn read_group(group: &Element) -> Result<LoadBalancingGroup, ConfigError> {
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
