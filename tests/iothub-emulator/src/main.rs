//! `iothub-emulator`: runs the IoT Hub emulator (a test tool, not IoT Hub) as a process.
//!
//! Stdout carries JSON lines only: one `{"event":"started",…}` line with the address and CA
//! path, one `{"event":"message",…}` line per recorded message (in arrival order), and one
//! line answering each stdin command. Logs go to stderr (`RUST_LOG`, default `info`).
//!
//! Stdin commands, one per line: `drop`, `refuse on|off`, `away`, `back`, `ack on|off`,
//! `stats`. End of stdin does not stop the emulator; a signal does.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use clap::Parser;
use iothub_emulator::{Emulator, EmulatorConfig, IdentityKey, Received};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

#[derive(Debug, Parser)]
#[command(
    name = "iothub-emulator",
    about = "Emulates a subset of Azure IoT Hub's MQTT device/module endpoint for tests (not IoT Hub)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8884")]
    bind: SocketAddr,
    /// IoT Hub host name expected in user names and token audiences.
    #[arg(long, default_value = "emulated.azure-devices.net")]
    hostname: String,
    /// Directory where ca.pem is written.
    #[arg(long)]
    tls_dir: PathBuf,
    /// An identity that may connect: `device/module=BASE64KEY` or `device=BASE64KEY`. Repeat.
    #[arg(long = "identity", value_parser = parse_identity)]
    identities: Vec<IdentityKey>,
}

fn parse_identity(s: &str) -> Result<IdentityKey, String> {
    let (id, key) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not device[/module]=BASE64KEY"))?;
    let key = STANDARD
        .decode(key)
        .map_err(|e| format!("key of `{id}` is not base64: {e}"))?;
    Ok(match id.split_once('/') {
        Some((d, m)) => IdentityKey::module(d, m, key),
        None => IdentityKey::device(id, key),
    })
}

fn emit(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn message_json(r: &Received) -> serde_json::Value {
    let mut v = json!({
        "event": "message",
        "identity": r.identity,
        "seq": r.seq,
        "connection": r.connection,
        "qos": r.qos,
        "dup": r.dup,
        "topic": r.topic,
        "properties": r.properties,
    });
    match std::str::from_utf8(&r.payload) {
        Ok(text) => v["payload"] = json!(text),
        Err(_) => v["payload_base64"] = json!(STANDARD.encode(&r.payload)),
    }
    v
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let emulator = match Emulator::start(EmulatorConfig {
        hostname: args.hostname,
        bind: args.bind,
        identities: args.identities,
        tls_dir: args.tls_dir,
    })
    .await
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("iothub-emulator: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    emit(&json!({
        "event": "started",
        "addr": emulator.addr().to_string(),
        "ca": emulator.ca_pem(),
        "hostname": emulator.hostname(),
    }));

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut printed = 0usize;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            r = emulator.wait_for_total(printed + 1, Duration::from_secs(3600)) => {
                if r.is_ok() {
                    for m in emulator.received_from(printed) {
                        emit(&message_json(&m));
                        printed += 1;
                    }
                }
            }
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(line)) => command(&emulator, line.trim()).await,
                Ok(None) | Err(_) => stdin_open = false,
            },
        }
    }
    std::process::ExitCode::SUCCESS
}

async fn command(emulator: &Emulator, line: &str) {
    let reply = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
        [] => return,
        ["drop"] => {
            emulator.drop_connections();
            json!({"event": "ok", "command": line})
        }
        ["refuse", v @ ("on" | "off")] => {
            emulator.refuse_logins(*v == "on");
            json!({"event": "ok", "command": line})
        }
        ["ack", v @ ("on" | "off")] => {
            emulator.set_ack(*v == "on");
            json!({"event": "ok", "command": line})
        }
        ["away"] => {
            emulator.go_away().await;
            json!({"event": "ok", "command": line})
        }
        ["back"] => match emulator.come_back().await {
            Ok(()) => json!({"event": "ok", "command": line}),
            Err(e) => json!({"event": "error", "command": line, "error": e.to_string()}),
        },
        ["stats"] => json!({"event": "stats", "stats": emulator.stats()}),
        _ => json!({
            "event": "error",
            "command": line,
            "error": "unknown command; use drop | refuse on|off | away | back | ack on|off | stats",
        }),
    };
    emit(&reply);
}
