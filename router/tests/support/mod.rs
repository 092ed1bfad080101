//! Test harness: a router, dispatcher and real store on a temporary directory, under tokio's
//! paused clock.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

pub mod sinks;

use std::path::Path;
use std::sync::Arc;

use router::{
    DeviceId, Dispatcher, DispatcherConfig, Endpoint, InputName, Message, ModuleId, OutputName,
    Priority, Route, RouteId, RouteOutcome, RouteTable, Router, Source, TokioClock, Ttl,
};
use store::{OsFs, Store, StoreOptions, UnixMillis};

/// 2023-11-14, so expiries are realistic.
pub const START: UnixMillis = UnixMillis(1_700_000_000_000);

pub struct Hub {
    pub store: Store,
    pub clock: Arc<TokioClock>,
    pub dispatcher: Dispatcher,
    pub router: Router,
}

impl Hub {
    /// Opens (or reopens) the store in `dir` and starts a dispatcher and router on it.
    pub fn open(dir: &Path, table: RouteTable, config: DispatcherConfig) -> Hub {
        Hub::open_with(dir, table, config, StoreOptions::default())
    }

    /// [`Hub::open`] with these store options.
    pub fn open_with(
        dir: &Path,
        table: RouteTable,
        config: DispatcherConfig,
        options: StoreOptions,
    ) -> Hub {
        let clock = Arc::new(TokioClock::new(START));
        let store =
            Store::open_with(dir, options, Arc::new(OsFs), clock.clone()).expect("store opens");
        let dispatcher = Dispatcher::start(store.clone(), clock.clone(), config).unwrap();
        let router = Router::new(table, &dispatcher);
        Hub {
            store,
            clock,
            dispatcher,
            router,
        }
    }

    /// Routes `bodies` from module `m` output `o`, submitting all before awaiting any ack.
    pub async fn send_all(&self, module: &str, output: &str, bodies: &[String]) {
        let acks: Vec<_> = bodies
            .iter()
            .map(|b| self.router.route(from_module(module, output, b)))
            .collect();
        for ack in acks {
            assert!(matches!(ack.await.unwrap(), RouteOutcome::Stored { .. }));
        }
    }

    /// Stops the workers and closes the store.
    pub async fn close(self) {
        let Hub {
            store,
            dispatcher,
            router,
            ..
        } = self;
        dispatcher.shutdown().await;
        drop(router);
        store.close().unwrap();
    }
}

pub fn bodies(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:03}")).collect()
}

pub fn from_module(module: &str, output: &str, body: &str) -> Message {
    let source = Source::ModuleOutput {
        device: DeviceId::new("edge"),
        module: ModuleId::new(module),
        output: Some(OutputName::new(output)),
    };
    Message::new(source, body.to_owned())
}

pub fn route(id: &str, text: &str, priority: u32, ttl: Ttl) -> Route {
    Route::parse(RouteId::new(id), text, Priority(priority), ttl).unwrap()
}

pub fn table(routes: Vec<Route>) -> RouteTable {
    RouteTable::new(routes)
}

pub fn module_input(module: &str, input: &str) -> Endpoint {
    Endpoint::ModuleInput {
        module: ModuleId::new(module),
        input: InputName::new(input),
    }
}

/// Everything from module `m` output `o` goes upstream at `priority` with `ttl`.
pub fn upstream_route(id: &str, output: &str, priority: u32, ttl: Ttl) -> Route {
    route(
        id,
        &format!("FROM /messages/modules/m/outputs/{output} INTO $upstream"),
        priority,
        ttl,
    )
}

pub fn config(window: usize) -> DispatcherConfig {
    DispatcherConfig {
        window,
        ..DispatcherConfig::default()
    }
}
