use proptest::prelude::*;

use super::*;
use crate::codec;
use crate::command::{LanAddress, NodeRole, SyncPhase};

fn node(name: &str) -> NodeRecord {
    NodeRecord {
        id: node_id_for_name(name),
        name: name.to_string(),
        lans: vec![LanAddress {
            lan: "default".into(),
            addr: format!("198.18.0.{}", name.len()),
        }],
        role: NodeRole::Voter,
        admin: NodeAdmin::Active,
    }
}

fn install(name: &str, kind: ModuleKind) -> Command {
    let package = format!("package of {name}").into_bytes();
    Command::InstallModule {
        name: name.into(),
        kind,
        digest: blake3::hash(&package).to_hex().to_string(),
        package,
    }
}

fn mirror(epoch: u64, prim: &str, second: &str) -> MirrorAssignment {
    MirrorAssignment {
        epoch,
        prim: Some(node_id_for_name(prim)),
        second: Some(node_id_for_name(second)),
        uptodate: [node_id_for_name(prim), node_id_for_name(second)].into(),
        phase: SyncPhase::Synced,
    }
}

fn rejected(response: CommandResponse) -> String {
    match response {
        CommandResponse::Rejected(reason) => reason,
        CommandResponse::Applied => panic!("expected a rejection"),
    }
}

#[test]
fn mirror_epochs_only_move_forward() {
    let mut state = ClusterState::default();
    state.apply(&Command::UpsertNode(node("a")));
    state.apply(&Command::UpsertNode(node("b")));
    assert_eq!(
        state.apply(&install("db", ModuleKind::Mirror)),
        CommandResponse::Applied
    );

    let assign = |epoch, prim, second| Command::AssignMirror {
        module: "db".into(),
        assignment: mirror(epoch, prim, second),
    };
    assert_eq!(state.apply(&assign(1, "a", "b")), CommandResponse::Applied);
    assert_eq!(state.apply(&assign(2, "b", "a")), CommandResponse::Applied);

    // An assignment decided under an older or equal epoch changes nothing.
    let before = state.clone();
    assert!(rejected(state.apply(&assign(2, "a", "b"))).contains("stale"));
    assert!(rejected(state.apply(&assign(1, "a", "b"))).contains("stale"));
    assert_eq!(state, before);
}

#[test]
fn only_an_up_to_date_node_can_be_prim() {
    let mut state = ClusterState::default();
    state.apply(&Command::UpsertNode(node("a")));
    state.apply(&Command::UpsertNode(node("b")));
    state.apply(&install("db", ModuleKind::Mirror));
    let mut assignment = mirror(1, "a", "b");
    assignment.uptodate = [node_id_for_name("b")].into();
    let reason = rejected(state.apply(&Command::AssignMirror {
        module: "db".into(),
        assignment,
    }));
    assert_eq!(reason, "PRIM must be up to date");
}

#[test]
fn a_node_with_a_role_cannot_be_removed() {
    let mut state = ClusterState::default();
    state.apply(&Command::UpsertNode(node("a")));
    state.apply(&Command::UpsertNode(node("b")));
    state.apply(&install("db", ModuleKind::Mirror));
    state.apply(&Command::AssignMirror {
        module: "db".into(),
        assignment: mirror(1, "a", "b"),
    });
    let reason = rejected(state.apply(&Command::RemoveNode {
        id: node_id_for_name("b"),
    }));
    assert!(
        reason.contains("still has a role in module 'db'"),
        "{reason}"
    );
}

#[test]
fn farm_assignment_needs_every_bucket_owned_by_an_up_member() {
    let mut state = ClusterState::default();
    state.apply(&Command::UpsertNode(node("a")));
    state.apply(&Command::UpsertNode(node("b")));
    state.apply(&install("web", ModuleKind::Farm));
    let a = node_id_for_name("a");
    let b = node_id_for_name("b");
    let short = FarmAssignment {
        epoch: 1,
        members_up: [a].into(),
        buckets: vec![Some(a); 10],
    };
    assert!(rejected(state.apply(&Command::AssignFarm {
        module: "web".into(),
        assignment: short
    }))
    .contains("256 buckets"));
    let foreign_owner = FarmAssignment {
        epoch: 1,
        members_up: [a].into(),
        buckets: vec![Some(b); FARM_BUCKETS],
    };
    assert!(rejected(state.apply(&Command::AssignFarm {
        module: "web".into(),
        assignment: foreign_owner
    }))
    .contains("not an up member"));
    let good = FarmAssignment {
        epoch: 1,
        members_up: [a, b].into(),
        buckets: (0..FARM_BUCKETS)
            .map(|i| Some(if i % 2 == 0 { a } else { b }))
            .collect(),
    };
    assert_eq!(
        state.apply(&Command::AssignFarm {
            module: "web".into(),
            assignment: good
        }),
        CommandResponse::Applied
    );
}

#[test]
fn package_digest_must_match_its_bytes() {
    let mut state = ClusterState::default();
    let reason = rejected(state.apply(&Command::InstallModule {
        name: "db".into(),
        kind: ModuleKind::Light,
        digest: blake3::hash(b"other").to_hex().to_string(),
        package: b"bytes".to_vec(),
    }));
    assert!(reason.contains("does not match"), "{reason}");
    assert!(state.modules.is_empty());
}

#[test]
fn names_that_could_escape_a_path_are_refused() {
    let mut state = ClusterState::default();
    for bad in ["", "../x", ".hidden", "a/b", "sp ace"] {
        let package = b"p".to_vec();
        let response = state.apply(&Command::InstallModule {
            name: bad.into(),
            kind: ModuleKind::Light,
            digest: blake3::hash(&package).to_hex().to_string(),
            package,
        });
        assert!(rejected(response).contains("invalid module name"));
    }
}

#[test]
fn a_light_module_runs_on_one_node_at_a_time() {
    let mut state = ClusterState::default();
    state.apply(&Command::UpsertNode(node("a")));
    state.apply(&Command::UpsertNode(node("b")));
    state.apply(&install("job", ModuleKind::Light));
    let start = |n: &str, started| Command::SetModuleStarted {
        name: "job".into(),
        node: node_id_for_name(n),
        started,
    };
    assert_eq!(state.apply(&start("a", true)), CommandResponse::Applied);
    assert!(rejected(state.apply(&start("b", true))).contains("already runs"));
    assert_eq!(state.apply(&start("a", false)), CommandResponse::Applied);
    assert_eq!(state.apply(&start("b", true)), CommandResponse::Applied);
}

#[test]
fn the_last_three_packages_are_kept() {
    let mut state = ClusterState::default();
    for version in 0..5 {
        let package = format!("v{version}").into_bytes();
        state.apply(&Command::InstallModule {
            name: "m".into(),
            kind: ModuleKind::Light,
            digest: blake3::hash(&package).to_hex().to_string(),
            package,
        });
    }
    let module = &state.modules["m"];
    assert_eq!(module.package, b"v4");
    let previous: Vec<&[u8]> = module
        .previous
        .iter()
        .map(|p| p.package.as_slice())
        .collect();
    assert_eq!(previous, [b"v3".as_slice(), b"v2".as_slice()]);
}

#[test]
fn compare_and_set_only_changes_an_expected_value() {
    let mut state = ClusterState::default();
    let cas = |expected, new| Command::RegisterCas {
        key: "r".into(),
        expected,
        new,
    };
    assert_eq!(state.apply(&cas(None, 1)), CommandResponse::Applied);
    assert!(rejected(state.apply(&cas(None, 2))).contains("holds 1, not nothing"));
    assert_eq!(state.apply(&cas(Some(1), 3)), CommandResponse::Applied);
    assert_eq!(state.registers["r"], 3);
}

// ---- Property tests: determinism and snapshot round trips --------------------------

const NAMES: [&str; 4] = ["n1", "n2", "n3", "n4"];
const MODULES: [&str; 3] = ["db", "web", "cron"];

fn arb_node() -> impl Strategy<Value = NodeId> {
    prop::sample::select(&NAMES[..]).prop_map(node_id_for_name)
}

fn arb_command() -> impl Strategy<Value = Command> {
    let module = prop::sample::select(&MODULES[..]).prop_map(String::from);
    let kind = prop::sample::select(&[ModuleKind::Mirror, ModuleKind::Farm, ModuleKind::Light][..]);
    prop_oneof![
        prop::sample::select(&NAMES[..]).prop_map(|n| Command::UpsertNode(node(n))),
        arb_node().prop_map(|id| Command::RemoveNode { id }),
        (module.clone(), kind).prop_map(|(m, k)| install(&m, k)),
        module
            .clone()
            .prop_map(|name| Command::UninstallModule { name }),
        (module.clone(), any::<bool>())
            .prop_map(|(name, failover)| Command::SetModuleFailover { name, failover }),
        (module.clone(), arb_node(), any::<bool>()).prop_map(|(name, node, started)| {
            Command::SetModuleStarted {
                name,
                node,
                started,
            }
        }),
        (
            module.clone(),
            0u64..6,
            arb_node(),
            arb_node(),
            any::<bool>()
        )
            .prop_map(|(module, epoch, prim, second, both)| {
                let mut uptodate = BTreeSet::from([prim]);
                if both {
                    uptodate.insert(second);
                }
                Command::AssignMirror {
                    module,
                    assignment: MirrorAssignment {
                        epoch,
                        prim: Some(prim),
                        second: Some(second),
                        uptodate,
                        phase: SyncPhase::Synced,
                    },
                }
            }),
        (
            module.clone(),
            0u64..6,
            prop::collection::vec(arb_node(), 1..3)
        )
            .prop_map(|(module, epoch, members)| {
                let members_up: BTreeSet<NodeId> = members.iter().copied().collect();
                let buckets = (0..FARM_BUCKETS)
                    .map(|b| Some(members[b % members.len()]))
                    .collect();
                Command::AssignFarm {
                    module,
                    assignment: FarmAssignment {
                        epoch,
                        members_up,
                        buckets,
                    },
                }
            }),
        (module.clone(), "[a-c]", arb_node()).prop_map(|(module, request_id, node)| {
            Command::RecordIntent {
                module,
                request_id,
                intent: OperatorIntent::Prim {
                    node,
                    fullsync: false,
                },
            }
        }),
        (module, "[a-c]")
            .prop_map(|(module, request_id)| Command::ClearIntent { module, request_id }),
        (
            "[a-c]",
            prop::sample::select(&[ApiRole::Monitor, ApiRole::Admin][..])
        )
            .prop_map(|(name, role)| Command::AddApiToken {
                token_hash: blake3::hash(name.as_bytes()).to_hex().to_string(),
                name,
                role,
            }),
    ]
}

proptest! {
    /// Two replicas applying the same log agree on every reply and on the final state,
    /// down to the encoded bytes; a replica restored from a snapshot taken half way
    /// through, then fed the rest, agrees too.
    #[test]
    fn replicas_applying_the_same_log_agree(commands in prop::collection::vec(arb_command(), 0..60)) {
        let mut first = ClusterState::default();
        let mut second = ClusterState::default();
        let half = commands.len() / 2;
        let mut restored: Option<ClusterState> = None;
        for (i, command) in commands.iter().enumerate() {
            if i == half {
                let snapshot = codec::encode(&second).unwrap();
                restored = Some(codec::decode(&snapshot).unwrap());
            }
            let reply = first.apply(command);
            prop_assert_eq!(&reply, &second.apply(command));
            if let Some(restored) = restored.as_mut() {
                prop_assert_eq!(&reply, &restored.apply(command));
            }
        }
        prop_assert_eq!(codec::encode(&first).unwrap(), codec::encode(&second).unwrap());
        if let Some(restored) = restored {
            prop_assert_eq!(&restored, &first);
        }
    }

    /// A snapshot decodes to exactly the state it was taken from.
    #[test]
    fn snapshots_round_trip(commands in prop::collection::vec(arb_command(), 0..60)) {
        let mut state = ClusterState::default();
        for command in &commands {
            state.apply(command);
        }
        let decoded: ClusterState = codec::decode(&codec::encode(&state).unwrap()).unwrap();
        prop_assert_eq!(decoded, state);
    }
}
