//! `etrn-relay`: CLI -> Config -> runtime. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use etrn_relay::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "etrn-relay",
    version,
    about = "Mail relay that holds mail for intermittently connected nodes and releases it on ETRN (RFC 1985)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay (the built-in default configuration when no --config is given).
    Serve {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and print the effective settings.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Show the queue: node, messages, bytes, age of the oldest (works while the server runs).
    Queue {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Ask a running relay to start a node's queue (ETRN), like `postqueue -s`.
    Flush {
        /// Node name, @domain or #queue.
        node: String,
        /// Relay address.
        #[arg(long, default_value = "127.0.0.1:2525")]
        server: String,
        /// AUTH user.
        #[arg(long)]
        user: Option<String>,
        /// AUTH password.
        #[arg(long)]
        password: Option<String>,
        /// AUTH mechanism: plain or cram-md5.
        #[arg(long, default_value = "cram-md5")]
        mech: String,
    },
}

fn load(path: &Option<PathBuf>) -> Result<Config, ExitCode> {
    match path {
        None => Ok(Config::builtin_default()),
        Some(p) => Config::load(p).map_err(|e| {
            eprintln!("etrn-relay: configuration error: {e}");
            ExitCode::from(2)
        }),
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ETRN_RELAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve { config } => {
            init_logging();
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            tracing::info!(hostname = %cfg.hostname, shards = cfg.shards, placement = ?cfg.placement, spool = %cfg.spool_dir.display(), nodes = cfg.nodes.len(), "starting etrn-relay");
            match etrn_relay::runtime::run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("etrn-relay: {e}");
                    // An unreadable certificate or key is a configuration error, like a bad key.
                    let code = if matches!(e, etrn_relay::runtime::StartError::Tls(_)) {
                        2
                    } else {
                        1
                    };
                    ExitCode::from(code)
                }
            }
        }
        Cmd::CheckConfig { config } => match load(&config) {
            Ok(c) => {
                println!(
                    "configuration ok: hostname {}, {} shard(s), {:?} placement, listen {:?}, spool {}, {} node(s)",
                    c.hostname,
                    c.shards,
                    c.placement,
                    c.smtp.listen,
                    c.spool_dir.display(),
                    c.nodes.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Cmd::Queue { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match etrn_relay::admin::print_queue(&cfg, &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("etrn-relay: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Flush {
            node,
            server,
            user,
            password,
            mech,
        } => match etrn_relay::admin::flush(&server, &node, user.as_deref(), password.as_deref(), &mech) {
            Ok(reply) => {
                println!("{reply}");
                if reply.starts_with('2') {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("etrn-relay: {e}");
                ExitCode::from(1)
            }
        },
    }
}
