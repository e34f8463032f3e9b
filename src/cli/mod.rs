//! The `rampart` command line: argument parsing and the commands.
//!
//! Commands other than `node` and `demo` talk to a node's admin API: by default the
//! node of this machine named in cluster.xml, with the admin token derived from the
//! cluster secret (so root on a node needs no further setup).

mod client;
pub mod demo;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rampart_raft::command::ApiRole;

use crate::api::views::{ClusterStatus, CreatedToken, JoinRequest, NewToken, TokenSummary};
use crate::config::ClusterConfig;
use crate::node::context::admin_token;
use client::ApiClient;

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
    Remove { name: String },
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
        name: String,
        #[arg(long, value_parser = clap::builder::ValueParser::new(|s: &str| s.parse::<ApiRole>()))]
        role: ApiRole,
    },
    List,
    Revoke {
        name: String,
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
                ClusterCommand::Remove { name } => {
                    client.delete(&format!("/v1/nodes/{name}")).await?
                }
                ClusterCommand::Secret { .. } => unreachable!("handled above"),
            };
            print(&cli, &status, output::status_table)
        }
        Command::Token(command) => {
            let client = api_client(&cli)?;
            match command {
                TokenCommand::Add { name, role } => {
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
                TokenCommand::Revoke { name } => {
                    let _: serde_json::Value = client.delete(&format!("/v1/tokens/{name}")).await?;
                    println!("revoked token '{name}'");
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
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
