//! Evidence for edgehub's dependency decision (reference/dependencies.md §1.1):
//! rumqttd acknowledges a QoS 1 publish and keeps the message only in memory,
//! so a `kill -9` after the PUBACK loses it.
//!
//! Modes:
//!   rumqttd-kill9 broker <port>
//!       Embeds rumqttd (`Broker::new(config)`, config built in code) with one
//!       MQTT 3.1.1 (v4) listener on 127.0.0.1:<port> and runs until killed.
//!   rumqttd-kill9 check subscribe-setup <port> <client-id> <topic>
//!       clean_session=false, SUBSCRIBE QoS 1, wait for SUBACK, DISCONNECT.
//!       This leaves a persistent session that the broker must keep messages for.
//!   rumqttd-kill9 check publish <port> <client-id> <topic> <payload>
//!       clean_session=false, PUBLISH QoS 1, print `PUBACK received` only once
//!       the PUBACK for that packet id has arrived.
//!   rumqttd-kill9 check subscribe <port> <client-id> <expected-payload> <deadline-secs>
//!       clean_session=false, does NOT re-subscribe (relies on the stored session),
//!       prints every PUBLISH that arrives before the deadline.
//!       Exit 0 if the expected payload arrived, 1 if not, 2 on error.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::time::{timeout_at, Instant};

const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

fn usage() -> ExitCode {
    eprintln!(
        "usage:\n  rumqttd-kill9 broker <port>\n  \
         rumqttd-kill9 check subscribe-setup <port> <client-id> <topic>\n  \
         rumqttd-kill9 check publish <port> <client-id> <topic> <payload>\n  \
         rumqttd-kill9 check subscribe <port> <client-id> <expected-payload> <deadline-secs>"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["broker", port] => match port.parse() {
            Ok(p) => broker(p),
            Err(_) => usage(),
        },
        ["check", rest @ ..] => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tokio runtime: {e}");
                    return ExitCode::from(2);
                }
            };
            let res = match rest {
                ["subscribe-setup", port, id, topic] => match port.parse() {
                    Ok(p) => rt.block_on(subscribe_setup(p, id, topic)),
                    Err(_) => return usage(),
                },
                ["publish", port, id, topic, payload] => match port.parse() {
                    Ok(p) => rt.block_on(publish(p, id, topic, payload)),
                    Err(_) => return usage(),
                },
                ["subscribe", port, id, expected, secs] => match (port.parse(), secs.parse()) {
                    (Ok(p), Ok(s)) => rt.block_on(subscribe(p, id, expected, s)),
                    _ => return usage(),
                },
                _ => return usage(),
            };
            match res {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("ERROR: {e}");
                    ExitCode::from(2)
                }
            }
        }
        _ => usage(),
    }
}

// ---------------------------------------------------------------- broker

fn broker(port: u16) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .try_init();

    let listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
    // Same values as rumqttd's shipped rumqttd.toml, built in code. Nothing in
    // rumqttd's Config names a directory or file: there is no place to persist to.
    let router = rumqttd::RouterConfig {
        max_connections: 10010,
        max_outgoing_packet_count: 200,
        max_segment_size: 104_857_600,
        max_segment_count: 10,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 20_480,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "v4-1".to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let mut v4 = HashMap::new();
    v4.insert("1".to_owned(), server);
    let config = rumqttd::Config {
        id: 0,
        router,
        v4: Some(v4),
        ..Default::default()
    };

    let mut broker = rumqttd::Broker::new(config);
    println!(
        "broker: embedded rumqttd pid={} v4 listener {listen} (clean_session=false sessions are kept in router memory)",
        std::process::id()
    );
    // start() spawns the router/listener threads and blocks joining them.
    match broker.start() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("broker error: {e:?}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------- clients

fn options(port: u16, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(false);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// Poll until CONNACK; returns session_present.
async fn wait_connack(ev: &mut rumqttc::EventLoop, who: &str) -> Result<bool, String> {
    let deadline = Instant::now() + CONNECT_DEADLINE;
    loop {
        match timeout_at(deadline, ev.poll()).await {
            Err(_) => return Err(format!("{who}: no CONNACK within {CONNECT_DEADLINE:?}")),
            Ok(Err(e)) => return Err(format!("{who}: connection error: {e}")),
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                println!(
                    "{who}: CONNACK code={:?} session_present={}",
                    ack.code, ack.session_present
                );
                return Ok(ack.session_present);
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// Send DISCONNECT and drive the event loop until it has gone out.
async fn disconnect(client: &AsyncClient, ev: &mut rumqttc::EventLoop, who: &str) {
    if client.disconnect().await.is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match timeout_at(deadline, ev.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => {
                println!("{who}: DISCONNECT sent");
                // Give the broker a moment to read it before the socket closes.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

async fn subscribe_setup(port: u16, id: &str, topic: &str) -> Result<ExitCode, String> {
    let who = format!("subscriber[{id}]");
    let (client, mut ev) = AsyncClient::new(options(port, id), 10);
    wait_connack(&mut ev, &who).await?;
    client
        .subscribe(topic, QoS::AtLeastOnce)
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + CONNECT_DEADLINE;
    loop {
        match timeout_at(deadline, ev.poll()).await {
            Err(_) => return Err(format!("{who}: no SUBACK")),
            Ok(Err(e)) => return Err(format!("{who}: {e}")),
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                println!("{who}: SUBACK {topic} return_codes={:?}", ack.return_codes);
                break;
            }
            Ok(Ok(_)) => {}
        }
    }
    disconnect(&client, &mut ev, &who).await;
    println!("{who}: offline now; persistent session (clean_session=false) left on the broker");
    Ok(ExitCode::SUCCESS)
}

async fn publish(port: u16, id: &str, topic: &str, payload: &str) -> Result<ExitCode, String> {
    let who = format!("publisher[{id}]");
    let (client, mut ev) = AsyncClient::new(options(port, id), 10);
    wait_connack(&mut ev, &who).await?;
    client
        .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + CONNECT_DEADLINE;
    let mut pkid = None;
    loop {
        match timeout_at(deadline, ev.poll()).await {
            Err(_) => return Err(format!("{who}: no PUBACK within {CONNECT_DEADLINE:?}")),
            Ok(Err(e)) => return Err(format!("{who}: {e}")),
            Ok(Ok(Event::Outgoing(Outgoing::Publish(p)))) => {
                println!("{who}: PUBLISH sent qos=1 pkid={p} topic={topic} payload={payload}");
                pkid = Some(p);
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) if Some(ack.pkid) == pkid => {
                println!("{who}: PUBACK received pkid={}", ack.pkid);
                break;
            }
            Ok(Ok(_)) => {}
        }
    }
    disconnect(&client, &mut ev, &who).await;
    Ok(ExitCode::SUCCESS)
}

async fn subscribe(port: u16, id: &str, expected: &str, secs: u64) -> Result<ExitCode, String> {
    let who = format!("subscriber[{id}]");
    let (client, mut ev) = AsyncClient::new(options(port, id), 10);
    wait_connack(&mut ev, &who).await?;
    println!("{who}: reconnected with clean_session=false, NOT re-subscribing; waiting {secs}s");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut got = 0usize;
    let mut found = false;
    loop {
        match timeout_at(deadline, ev.poll()).await {
            Err(_) => break,
            Ok(Err(e)) => return Err(format!("{who}: {e}")),
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                got += 1;
                let body = String::from_utf8_lossy(&p.payload);
                println!(
                    "{who}: RECEIVED topic={} qos={:?} payload={body}",
                    p.topic, p.qos
                );
                if body == expected {
                    found = true;
                    break;
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    disconnect(&client, &mut ev, &who).await;
    if found {
        println!("{who}: RESULT expected payload ARRIVED ({got} message(s))");
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "{who}: RESULT expected payload NOT received within {secs}s ({got} message(s) arrived)"
        );
        Ok(ExitCode::from(1))
    }
}
