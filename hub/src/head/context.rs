//! What every connection of the MQTT and AMQP heads shares: the router and dispatcher, identities
//! and their keys, the registry of live connections, metrics and the shutdown signal. (MQTT's
//! persistent sessions are the MQTT head's own: `mqtt::sessions`.)

use std::sync::Arc;

use router::{Dispatcher, DynSink, Endpoint, InputName, Router};
use store::{Clock, UnixMillis};
use tokio::sync::watch;

use crate::auth::credentials::CredentialError;
use crate::auth::sas;
use crate::head::registry::Registry;
use crate::head::sink::{ModuleInputSink, OutboundTx};
use crate::identity::{Identities, Identity};
use crate::methods::Methods;
use crate::metrics::HubMetrics;

/// Declares a deployment's replicated modules to the router (partition keys: where their
/// inputs' messages are stored) and the dispatcher (counts: a change reaches every replicated
/// input served, `Replicas::set_count`). At startup and on every reload.
pub fn declare_replicas(
    router: &Router,
    dispatcher: &Dispatcher,
    replicas: &std::collections::BTreeMap<router::ModuleId, router::replicas::ReplicaSpec>,
) {
    dispatcher.set_replica_counts(replicas.iter().map(|(m, s)| (m.clone(), s.count)).collect());
    router.set_replicas(
        replicas
            .iter()
            .map(|(m, s)| (m.clone(), s.key.clone()))
            .collect(),
    );
}

/// The input sinks one receiver registered, by endpoint: only these are removed when it goes.
pub type RegisteredSinks = Vec<(Endpoint, Arc<dyn DynSink>)>;

/// Shared by every connection of the MQTT and AMQP heads.
pub struct HeadContext {
    /// Routes publishes (the acknowledgement point).
    pub router: Router,
    /// Takes the sinks of connected modules.
    pub dispatcher: Arc<Dispatcher>,
    /// Module identities and keys.
    pub identities: Arc<Identities>,
    /// Live connections.
    pub connections: Registry,
    /// Counters the head feeds.
    pub metrics: Arc<HubMetrics>,
    /// Turns true when the hub shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Host names a SAS token's audience may name: the IoT Hub's and the gateway's.
    pub audiences: Vec<String>,
    /// Bumped after every manifest reload that changed the routes: a connected receiver then
    /// registers the input endpoints that routes name for its module from now on.
    pub routes_changed: watch::Sender<u64>,
    /// The wall clock (token expiry, enqueue times): the one the composition root was given.
    pub clock: Arc<dyn Clock>,
    /// Direct-method targets and the requests waiting for their answers.
    pub methods: Arc<Methods>,
    /// Module twins (desired properties from the manifest, durable reported properties).
    pub twins: Arc<crate::twin::Twins>,
}

impl HeadContext {
    /// Verifies a SAS token for `identity` against its key, now.
    pub fn verify_token(
        &self,
        token: &str,
        key: &[u8],
        identity: &Identity,
    ) -> Result<(), CredentialError> {
        self.verify_token_expiry(token, key, identity).map(drop)
    }

    /// [`HeadContext::verify_token`], returning the token's expiry (seconds since the epoch).
    pub fn verify_token_expiry(
        &self,
        token: &str,
        key: &[u8],
        identity: &Identity,
    ) -> Result<u64, CredentialError> {
        let now = self.now_secs();
        let hosts: Vec<&str> = self.audiences.iter().map(String::as_str).collect();
        let expected = sas::ExpectedAudience {
            hosts: &hosts,
            device: identity.device.as_str(),
            module: Some(identity.module.as_str()),
        };
        sas::verify(token, key, &expected, now)
            .map(|t| t.expiry)
            .map_err(CredentialError::Token)
    }

    /// Makes `connection` the sink of every input endpoint of `identity`'s module, each only
    /// while `current()` holds (checked under the dispatcher's lock, so a receiver that is no
    /// longer the module's live one never overwrites a newer one's sinks). Returns the sinks
    /// registered, and whether `current()` held throughout.
    pub fn register_input_sinks(
        &self,
        identity: &Identity,
        connection: &OutboundTx,
        current: impl Fn() -> bool,
    ) -> (RegisteredSinks, bool) {
        let mut registered = Vec::new();
        if !current() {
            return (registered, false);
        }
        for (endpoint, input) in self.input_endpoints(identity) {
            let sink: Arc<dyn DynSink> = Arc::new(ModuleInputSink::new(input, connection.clone()));
            if !self
                .dispatcher
                .register_dyn_sink_if(&endpoint, Arc::clone(&sink), &current)
            {
                return (registered, false);
            }
            registered.push((endpoint, sink));
        }
        (registered, true)
    }

    /// Registers `connection` as the sink of each input endpoint of `identity`'s module that
    /// is not in `registered` yet (routes a reload added), each only while `current()` holds,
    /// and adds them to `registered`. Sinks already registered stay as they are (deliveries in
    /// flight on them are untouched). Returns whether `current()` held throughout.
    pub fn register_new_input_sinks(
        &self,
        identity: &Identity,
        connection: &OutboundTx,
        current: impl Fn() -> bool,
        registered: &mut RegisteredSinks,
    ) -> bool {
        for (endpoint, input) in self.input_endpoints(identity) {
            if registered.iter().any(|(e, _)| *e == endpoint) {
                continue;
            }
            let sink: Arc<dyn DynSink> = Arc::new(ModuleInputSink::new(input, connection.clone()));
            if !self
                .dispatcher
                .register_dyn_sink_if(&endpoint, Arc::clone(&sink), &current)
            {
                return false;
            }
            registered.push((endpoint, sink));
        }
        true
    }

    /// Removes the sinks in `registered` that are still registered: a receiver going away
    /// never takes away the sinks a newer one registered since.
    pub fn unregister_own_sinks(&self, registered: &RegisteredSinks) {
        for (endpoint, sink) in registered {
            self.dispatcher
                .unregister_sink_if(endpoint, |current| Arc::ptr_eq(current, sink));
        }
    }

    /// Takes every input sink of `identity`'s module away, whoever registered it: for a new
    /// connection of the module, whose predecessors are gone or going.
    pub fn unregister_input_sinks(&self, identity: &Identity) {
        for (endpoint, _) in self.input_endpoints(identity) {
            self.dispatcher.unregister_sink(&endpoint);
        }
    }

    /// Seconds since the Unix epoch, now, by the hub's clock (0 if it is before the epoch).
    pub fn now_secs(&self) -> u64 {
        self.clock.now().0 / 1000
    }

    /// Milliseconds since the Unix epoch, now, by the hub's clock.
    pub fn now_millis(&self) -> UnixMillis {
        self.clock.now()
    }

    /// Every input endpoint of `identity`'s module: named by a route, or holding queued
    /// messages from an earlier manifest.
    pub fn input_endpoints(&self, identity: &Identity) -> Vec<(Endpoint, InputName)> {
        let mut out: Vec<(Endpoint, InputName)> = Vec::new();
        let from_routes = self.router.table().endpoints();
        let queued = self.dispatcher.endpoints();
        let all = from_routes
            .into_iter()
            .chain(queued.iter().filter_map(Endpoint::from_id));
        for endpoint in all {
            if let Endpoint::ModuleInput { module, input } = &endpoint {
                if *module == identity.module && !out.iter().any(|(e, _)| *e == endpoint) {
                    out.push((endpoint.clone(), input.clone()));
                }
            }
        }
        out
    }
}
