//! A module's state on one node, SafeKit's names, with the exit codes of
//! `rampart state`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ModuleState {
    Stop,
    /// Waiting for a condition (a peer, an up-to-date copy, an operator).
    Wait,
    /// Running without a peer (mirror), or running a light module.
    Alone,
    /// Running as a farm member.
    Up,
    Prim,
    Second,
}

impl ModuleState {
    /// `rampart state` exit code: STOP 0, WAIT 1, ALONE/UP 2, PRIM 3, SECOND 4.
    pub fn exit_code(self) -> u8 {
        match self {
            ModuleState::Stop => 0,
            ModuleState::Wait => 1,
            ModuleState::Alone | ModuleState::Up => 2,
            ModuleState::Prim => 3,
            ModuleState::Second => 4,
        }
    }

    /// Runs the application (what `<proc class="prim">` and `when="prim"` watch).
    pub fn runs_app(self) -> bool {
        matches!(
            self,
            ModuleState::Alone | ModuleState::Up | ModuleState::Prim
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            ModuleState::Stop => "STOP",
            ModuleState::Wait => "WAIT",
            ModuleState::Alone => "ALONE",
            ModuleState::Up => "UP",
            ModuleState::Prim => "PRIM",
            ModuleState::Second => "SECOND",
        }
    }
}

/// Whether the state is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Readiness {
    /// Settled and healthy.
    Ready,
    /// Moving: scripts are running towards the next state.
    Transient,
    /// Settled but not serving (stopped on an error, waiting).
    NotReady,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceState {
    Unknown,
    Up,
    Down,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_safekit() {
        let codes: Vec<u8> = [
            ModuleState::Stop,
            ModuleState::Wait,
            ModuleState::Alone,
            ModuleState::Up,
            ModuleState::Prim,
            ModuleState::Second,
        ]
        .iter()
        .map(|s| s.exit_code())
        .collect();
        assert_eq!(codes, [0, 1, 2, 2, 3, 4]);
        assert_eq!(
            serde_json::to_string(&ModuleState::Alone).unwrap(),
            "\"ALONE\""
        );
    }
}
