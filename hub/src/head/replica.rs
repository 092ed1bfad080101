//! A connection of a replicated module (`x-edgehub-replicas`, issue 17) as a member of each of
//! its inputs' replica machines (`router::replica_worker::ReplicatedInput`), for both heads:
//! membership is per connection, so MQTT and AMQP replicas of one module are members of the
//! same machines side by side.
//!
//! ```text
//! authenticated (MQTT CONNECT; AMQP SASL PLAIN or $cbs put-token) ─▶ registry (beside the
//!   module's other replicas, replacing none) ─▶ join every replicated input of the module
//!     ─┬─ all admitted ─▶ a member (MQTT: CONNACK 0; AMQP: the put-token's 200)
//!      └─ one refused (its count reached, every member heard within 10 s) ─▶ leave the
//!         others; logged with the module, counted (replicas_full); MQTT: CONNACK 3; AMQP:
//!         the connection is closed with an error (see `amqp::connection`)
//! inputs subscribed (MQTT SUBSCRIBE devices/{d}/modules/{m}/#, AMQP inputs link attached)
//!   ─▶ attach this connection's sink to each input     (AMQP inputs link ends ─▶ detach)
//! every packet / frame read ─▶ heartbeat (a member silent 10 s may be displaced by a newcomer)
//! displaced / scaled down / lost a delivery ─▶ the machine closes the connection
//! connection ends ─▶ closed cleanly by the client (MQTT DISCONNECT, AMQP Close): leave;
//!                    anything else: crash (deliveries in flight abandoned, delivered again to
//!                    the next owner, counted)
//! ```

use std::sync::Arc;

use router::replica_worker::{Heartbeat, ReplicatedInput};
use router::replicas::{DisconnectReason, JoinRefused, MemberId};
use router::{DynSink, Endpoint, InputName};
use tokio::sync::watch;

use crate::head::context::HeadContext;
use crate::head::sink::{ModuleInputSink, OutboundTx};
use crate::identity::Identity;

/// Why a module's replica machine closed one of its connections (in the connection's log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaClose {
    /// A newcomer took its slot while it was silent, or its connection lost a delivery.
    #[error("displaced by its module's replicas (silent 10 s while another replica waited to join, or a delivery lost)")]
    Displaced,
    /// The module's replica count was lowered below its slot, and it had settled what it held.
    #[error("scaled down: its module's replica count was lowered")]
    ScaledDown,
}

/// Where the machine's reason for closing a member's connection is kept until the connection
/// reads it (the close itself is the connection's `replaced` watch).
#[derive(Debug, Clone, Default)]
pub(crate) struct ClosedBy(Arc<std::sync::Mutex<Option<ReplicaClose>>>);

impl ClosedBy {
    fn set(&self, reason: DisconnectReason) {
        let why = match reason {
            DisconnectReason::Displaced => ReplicaClose::Displaced,
            DisconnectReason::ScaledDown => ReplicaClose::ScaledDown,
        };
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// The reason, once the machine closed the connection.
    pub(crate) fn get(&self) -> Option<ReplicaClose> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One connection's membership in its module's replicated inputs.
pub(crate) struct Membership {
    member: MemberId,
    heartbeat: Arc<Heartbeat>,
    close: Arc<watch::Sender<bool>>,
    closed_by: ClosedBy,
    inputs: Vec<(Endpoint, InputName, Arc<ReplicatedInput>)>,
    /// Set once the connection subscribed to its inputs.
    attached: Option<OutboundTx>,
}

/// Why a connection of a replicated module is refused.
#[derive(Debug, thiserror::Error)]
#[error("{module} has all its replicas: {reason}")]
pub struct ReplicasFull {
    /// The module.
    pub module: String,
    /// The machine's answer.
    #[source]
    pub reason: JoinRefused,
}

impl Membership {
    /// Joins connection `conn_id` to every replicated input of `identity`'s module, heard from
    /// through `heartbeat` (the head beats it on every packet or frame it reads); on a refusal
    /// it leaves the inputs it joined and nothing changed.
    pub(crate) fn join(
        ctx: &HeadContext,
        identity: &Identity,
        conn_id: u64,
        close: Arc<watch::Sender<bool>>,
        heartbeat: Arc<Heartbeat>,
    ) -> Result<Membership, ReplicasFull> {
        let mut membership = Membership {
            member: MemberId::new(conn_id),
            heartbeat,
            close,
            closed_by: ClosedBy::default(),
            inputs: Vec::new(),
            attached: None,
        };
        for (endpoint, input) in ctx.input_endpoints(identity) {
            if let Err(reason) = membership.join_input(ctx, endpoint, input) {
                membership.leave_all(false);
                return Err(ReplicasFull {
                    module: identity.module.as_str().to_owned(),
                    reason,
                });
            }
        }
        Ok(membership)
    }

    fn join_input(
        &mut self,
        ctx: &HeadContext,
        endpoint: Endpoint,
        input: InputName,
    ) -> Result<(), JoinRefused> {
        let Some(replicated) = ctx.dispatcher.replicated_input(&endpoint) else {
            return Ok(());
        };
        let close = Arc::clone(&self.close);
        let closed_by = self.closed_by.clone();
        replicated.join(
            self.member,
            Arc::clone(&self.heartbeat),
            Box::new(move |reason| {
                closed_by.set(reason);
                let _ = close.send(true);
            }),
        )?;
        if let Some(outbound) = &self.attached {
            replicated.attach(self.member, sink(&input, outbound));
        }
        self.inputs.push((endpoint, input, replicated));
        Ok(())
    }

    /// Why the machine closed this connection, once it did (read when `replaced` fires).
    pub(crate) fn closed_by(&self) -> ClosedBy {
        self.closed_by.clone()
    }

    /// The connection read a packet.
    pub(crate) fn heard(&self) {
        self.heartbeat.beat();
    }

    /// The connection subscribed to its inputs: it receives what it owns through `outbound`.
    pub(crate) fn attach(&mut self, outbound: &OutboundTx) {
        for (_, input, replicated) in &self.inputs {
            replicated.attach(self.member, sink(input, outbound));
        }
        self.attached = Some(outbound.clone());
    }

    /// The connection stopped receiving through `outbound` (an AMQP inputs link ended while
    /// the connection stays): nothing more is handed to it; what the member owns waits for its
    /// next attach. Nothing happens if it receives through another queue since.
    pub(crate) fn detach(&mut self, outbound: &OutboundTx) {
        if !self
            .attached
            .as_ref()
            .is_some_and(|a| a.same_channel(outbound))
        {
            return;
        }
        for (_, _, replicated) in &self.inputs {
            replicated.detach(self.member);
        }
        self.attached = None;
    }

    /// After a reload: joins the replicated inputs routes now name (a refusal is logged; the
    /// connection stays a member of the others).
    pub(crate) fn join_new_inputs(&mut self, ctx: &HeadContext, identity: &Identity) {
        for (endpoint, input) in ctx.input_endpoints(identity) {
            if self.inputs.iter().any(|(e, _, _)| *e == endpoint) {
                continue;
            }
            if let Err(reason) = self.join_input(ctx, endpoint.clone(), input) {
                tracing::warn!(%identity, %endpoint, error = %reason,
                    "a replica could not join an input a reload added");
            }
        }
    }

    /// The connection ended: cleanly (`clean`: DISCONNECT) or not.
    pub(crate) fn leave_all(&mut self, clean: bool) {
        for (_, _, replicated) in self.inputs.drain(..) {
            if clean {
                replicated.leave(self.member);
            } else {
                replicated.crash(self.member);
            }
        }
    }
}

fn sink(input: &InputName, outbound: &OutboundTx) -> Arc<dyn DynSink> {
    Arc::new(ModuleInputSink::new(input.clone(), outbound.clone()))
}
