//! The `rampart` command line: argument parsing and the commands.
//!
//! Commands other than `node` and `demo` talk to a node's admin API: by default the
//! node of this machine named in cluster.xml, with the admin token derived from the
//! cluster secret (so root on a node needs no further setup).

mod client;
pub mod demo;
mod mirror;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rampart_raft::command::ApiRole;

use crate::api::views::{
    ClusterStatus, CreatedToken, JoinRequest, LogPage, ModuleDetail, ModuleSummary, NewToken,
    TokenSummary,
};
use crate::config::ClusterConfig;
use crate::module::runtime::ModuleStatus;
use crate::node::context::admin_token;
use client::ApiClient;

// Positional arguments are never called `name`: that id is the global `--name`.
#[derive(Parser, Debug)]
#[command(name = "rampart", version, about = "High-availability cluster manager")]
pub struct Cli {
    /// cluster.xml of this cluster.
    #[arg(
        long,
        global = true,
        env = "RAMPART_CONFIG",
        default_value = "/etc/rampart/cluster.xml"
    )]
    pub config: PathBuf,
    /// This node's name in cluster.xml (default: the node whose address is local).
    #[arg(long, global = true, env = "RAMPART_NODE")]
    pub name: Option<String>,
    /// Admin API to talk to, `host:port` (default: this node's, from cluster.xml).
    #[arg(long, global = true, env = "RAMPART_API")]
    pub api: Option<String>,
    /// API token (default: the admin token derived from the cluster secret).
    #[arg(long, global = true, env = "RAMPART_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run this node (Raft, transport, admin API) until SIGTERM.
    Node,
    /// Show the cluster: members, leader, term, commit index.
    Status,
    #[command(subcommand)]
    Cluster(ClusterCommand),
    #[command(subcommand)]
    Token(TokenCommand),
    /// Start a local demonstration cluster of three nodes on 127.0.0.1.
    Demo(demo::DemoArgs),
    /// Install, list, export, uninstall and configure modules.
    #[command(subcommand)]
    Module(ModuleCommand),
    /// Start a module on a node (this one by default).
    Start(Operation),
    /// Stop a module on a node.
    Stop(Operation),
    /// Restart a module's application on a node (stop_prim, start_prim).
    Restart(Operation),
    /// Stop and start a module on a node (all scripts).
    Stopstart(Operation),
    /// A module's state on a node; exit code STOP 0, WAIT 1, ALONE/UP 2, PRIM 3, SECOND 4.
    State(Operation),
    /// Run or inspect one side of a replicated directory by hand.
    #[command(subcommand)]
    Mirror(mirror::MirrorCommand),
    /// A module's log on a node.
    Log {
        #[command(flatten)]
        target: Operation,
        /// Include script output.
        #[arg(short, long)]
        verbose: bool,
        /// Most recent entries to show.
        #[arg(long, default_value_t = 100)]
        last: usize,
    },
}

#[derive(clap::Args, Debug)]
pub struct Operation {
    /// The module.
    #[arg(short, long)]
    pub module: String,
    /// The node (default: the node of this machine, or --api's).
    #[arg(long)]
    pub on: Option<String>,
}

impl Operation {
    fn query(&self) -> String {
        match &self.on {
            Some(node) => format!("?node={node}"),
            None => String::new(),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum ModuleCommand {
    /// Install (or upgrade) a module from a NAME.safe package.
    Install {
        file: PathBuf,
    },
    List,
    /// Write a module's package to a file.
    Export {
        module: String,
        #[arg(long)]
        out: PathBuf,
    },
    Uninstall {
        module: String,
    },
    /// Print or replace a module's userconfig.xml (validated before it is committed).
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    Get { module: String },
    Set { module: String, file: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Form a new cluster of every node in cluster.xml (run once, on one node).
    Init,
    /// Make this node a member of the cluster that `--seed` belongs to.
    Join {
        /// Raft address (host:port) of any member.
        #[arg(long)]
        seed: String,
    },
    /// Take this node out of the cluster.
    Leave,
    /// Take another node out of the cluster (for a node that is gone for good).
    Remove {
        #[arg(value_name = "NODE")]
        node: String,
    },
    /// Write a new random cluster secret to a file (mode 0600).
    Secret {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create an API token; it is printed once and never stored.
    Add {
        #[arg(value_name = "NAME")]
        token: String,
        #[arg(long, value_parser = clap::builder::ValueParser::new(|s: &str| s.parse::<ApiRole>()))]
        role: ApiRole,
    },
    List,
    Revoke {
        #[arg(value_name = "NAME")]
        token: String,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Node => {
            let config = load_config(&cli)?;
            crate::node::run(config, cli.name.as_deref()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Mirror(command) => mirror::run(command).await,
        Command::Cluster(ClusterCommand::Secret { out }) => {
            write_secret(out)?;
            println!("wrote a new cluster secret to {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let status: ClusterStatus = api_client(&cli)?.get("/v1/cluster").await?;
            print(&cli, &status, output::status_table)
        }
        Command::Cluster(command) => {
            let client = api_client(&cli)?;
            let status: ClusterStatus = match command {
                ClusterCommand::Init => client.post("/v1/cluster/init", &()).await?,
                ClusterCommand::Join { seed } => {
                    client
                        .post("/v1/cluster/join", &JoinRequest { seed: seed.clone() })
                        .await?
                }
                ClusterCommand::Leave => client.post("/v1/cluster/leave", &()).await?,
                ClusterCommand::Remove { node } => {
                    client.delete(&format!("/v1/nodes/{node}")).await?
                }
                ClusterCommand::Secret { .. } => unreachable!("handled above"),
            };
            print(&cli, &status, output::status_table)
        }
        Command::Module(command) => module_command(&cli, command).await,
        Command::Start(op) | Command::Stop(op) => {
            let verb = if matches!(cli.command, Command::Start(_)) {
                "start"
            } else {
                "stop"
            };
            let client = api_client(&cli)?;
            let _: serde_json::Value = client
                .post(
                    &format!("/v1/modules/{}/{verb}{}", op.module, op.query()),
                    &(),
                )
                .await?;
            println!("{verb} of module '{}' committed", op.module);
            Ok(ExitCode::SUCCESS)
        }
        Command::Restart(op) | Command::Stopstart(op) => {
            let verb = if matches!(cli.command, Command::Restart(_)) {
                "restart"
            } else {
                "stopstart"
            };
            let status: ModuleStatus = api_client(&cli)?
                .post(
                    &format!("/v1/modules/{}/{verb}{}", op.module, op.query()),
                    &(),
                )
                .await?;
            print(&cli, &status, output::module_status)
        }
        Command::State(op) => {
            let status: ModuleStatus = api_client(&cli)?
                .get(&format!("/v1/modules/{}/state{}", op.module, op.query()))
                .await?;
            print(&cli, &status, output::module_status)?;
            Ok(ExitCode::from(status.state.exit_code()))
        }
        Command::Log {
            target,
            verbose,
            last,
        } => {
            let client = api_client(&cli)?;
            let base = format!(
                "/v1/modules/{}/log?verbose={verbose}{}",
                target.module,
                target
                    .on
                    .as_ref()
                    .map_or(String::new(), |n| format!("&node={n}"))
            );
            // Read through, keeping the last entries.
            let mut entries = std::collections::VecDeque::new();
            let mut offset = 0;
            loop {
                let page: LogPage = client
                    .get(&format!("{base}&offset={offset}&limit=1000"))
                    .await?;
                for entry in page.entries {
                    entries.push_back(entry);
                    if entries.len() > *last {
                        entries.pop_front();
                    }
                }
                // The log ends where reading made no progress.
                if page.next_offset == offset {
                    break;
                }
                offset = page.next_offset;
            }
            let entries: Vec<_> = entries.into_iter().collect();
            print(&cli, &entries, |e| output::log_lines(e))
        }
        Command::Token(command) => {
            let client = api_client(&cli)?;
            match command {
                TokenCommand::Add { token: name, role } => {
                    let created: CreatedToken = client
                        .post(
                            "/v1/tokens",
                            &NewToken {
                                name: name.clone(),
                                role: *role,
                            },
                        )
                        .await?;
                    print(&cli, &created, |t| format!("{}\n", t.token))
                }
                TokenCommand::List => {
                    let tokens: Vec<TokenSummary> = client.get("/v1/tokens").await?;
                    print(&cli, &tokens, |t| output::token_table(t))
                }
                TokenCommand::Revoke { token: name } => {
                    let _: serde_json::Value = client.delete(&format!("/v1/tokens/{name}")).await?;
                    println!("revoked token '{name}'");
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
    }
}

async fn module_command(cli: &Cli, command: &ModuleCommand) -> anyhow::Result<ExitCode> {
    let client = api_client(cli)?;
    match command {
        ModuleCommand::Install { file } => {
            let bytes =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let detail: ModuleDetail = client
                .post_bytes("/v1/modules", bytes, "application/zip")
                .await?;
            print_warnings(&detail);
            print(cli, &detail, |d| {
                format!(
                    "installed module '{}' ({:?}), package {}\n",
                    d.name,
                    d.kind,
                    &d.digest[..16]
                )
            })
        }
        ModuleCommand::List => {
            let modules: Vec<ModuleSummary> = client.get("/v1/modules").await?;
            print(cli, &modules, |m| output::module_table(m))
        }
        ModuleCommand::Export { module: name, out } => {
            let bytes = client
                .get_bytes(&format!("/v1/modules/{name}/package"))
                .await?;
            std::fs::write(out, bytes).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote module '{name}' to {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        ModuleCommand::Uninstall { module: name } => {
            let _: serde_json::Value = client.delete(&format!("/v1/modules/{name}")).await?;
            println!("uninstalled module '{name}'");
            Ok(ExitCode::SUCCESS)
        }
        ModuleCommand::Config(ConfigCommand::Get { module: name }) => {
            let bytes = client
                .get_bytes(&format!("/v1/modules/{name}/config"))
                .await?;
            print!("{}", String::from_utf8_lossy(&bytes));
            Ok(ExitCode::SUCCESS)
        }
        ModuleCommand::Config(ConfigCommand::Set { module: name, file }) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let detail: ModuleDetail = client
                .put_text(&format!("/v1/modules/{name}/config"), text)
                .await?;
            print_warnings(&detail);
            print(cli, &detail, |d| {
                format!("module '{}' now runs package {}\n", d.name, &d.digest[..16])
            })
        }
    }
}

fn print_warnings(detail: &ModuleDetail) {
    for warning in &detail.warnings {
        eprintln!("warning: {warning}");
    }
}

fn print<T: serde::Serialize>(
    cli: &Cli,
    value: &T,
    human: impl Fn(&T) -> String,
) -> anyhow::Result<ExitCode> {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", human(value));
    }
    Ok(ExitCode::SUCCESS)
}

fn load_config(cli: &Cli) -> anyhow::Result<ClusterConfig> {
    ClusterConfig::load(&cli.config).map_err(anyhow::Error::new)
}

fn api_client(cli: &Cli) -> anyhow::Result<ApiClient> {
    let needs_config = cli.api.is_none() || cli.token.is_none();
    let config = if needs_config {
        Some(load_config(cli)?)
    } else {
        None
    };
    let api = match &cli.api {
        Some(api) => api.clone(),
        None => config
            .as_ref()
            .expect("loaded when --api is absent")
            .local_node(cli.name.as_deref())
            .map_err(anyhow::Error::msg)?
            .api_addr(),
    };
    let token = match &cli.token {
        Some(token) => token.clone(),
        None => admin_token(
            &config
                .as_ref()
                .expect("loaded when --token is absent")
                .read_secret()
                .map_err(anyhow::Error::msg)?,
        ),
    };
    Ok(ApiClient::new(api, token))
}

/// Writes 32 random bytes, hex-encoded, readable by root only.
pub fn write_secret(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let hex = crate::node::context::random_hex(32);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (an existing secret is never overwritten)",
                path.display()
            )
        })?;
    writeln!(file, "{hex}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn arguments_are_consistent_and_positionals_do_not_shadow_the_node_name() {
        Cli::command().debug_assert();
        let cli = Cli::parse_from(["rampart", "--name", "n1", "module", "config", "get", "web"]);
        assert_eq!(cli.name.as_deref(), Some("n1"));
        assert!(matches!(
            cli.command,
            Command::Module(ModuleCommand::Config(ConfigCommand::Get { ref module })) if module == "web"
        ));
        let cli = Cli::parse_from([
            "rampart", "--name", "n1", "token", "add", "grafana", "--role", "monitor",
        ]);
        assert_eq!(cli.name.as_deref(), Some("n1"));
    }
}
