//! Delivery through the router, dispatcher and endpoint workers over a real store, with fault
//! sinks: order, no loss, retries, priority, TTL, rejects, head-of-line policy, restart, reload,
//! and the edgehub extensions (per-route set-aside, live-first lanes).

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use router::{
    DeliveryOptions, DeliveryOutcome, Endpoint, EndpointPolicy, Lane, Priority, QueueId,
    RouteOutcome, Ttl,
};
use store::Offset;
use support::sinks::{
    FailingSink, PartialFailureSink, RecordingSink, RejectingSink, RevivableSink, SlowSink,
    StalledSink,
};
use support::{bodies, config, from_module, module_input, route, table, upstream_route, Hub};

/// Fails everything until it has delivered a message called "alarm" (paused time may run the
/// backoff any number of times while the alarm is being stored, so the failure must last until
/// the alarm, not for a number of attempts).
#[derive(Clone, Debug, Default)]
struct FailsUntilAlarm {
    log: support::sinks::Log,
}

impl router::Sink for FailsUntilAlarm {
    async fn send(&self, batch: Vec<router::Delivery>) -> Vec<DeliveryOutcome> {
        let mut open = self.log.delivered().iter().any(|b| b == "alarm");
        let outcomes: Vec<DeliveryOutcome> = batch
            .iter()
            .map(|d| {
                open |= support::sinks::body(d) == "alarm";
                if open {
                    DeliveryOutcome::Delivered
                } else {
                    DeliveryOutcome::Retry(router::FailureKind::NoReceiver)
                }
            })
            .collect();
        self.log.record(&batch, &outcomes);
        outcomes
    }
}

fn upstream_queue(priority: u32) -> store::QueueName {
    QueueId::new(Endpoint::Upstream, Priority(priority))
        .name()
        .unwrap()
}

fn upstream_hub(dir: &std::path::Path, window: usize) -> Hub {
    Hub::open(
        dir,
        table(vec![upstream_route("r", "o", 1, Ttl::Infinite)]),
        config(window),
    )
}

/// Returns once the checkpoint the worker submitted for its last answered batch is durable.
///
/// The worker submits that checkpoint before it next yields, so by the time a test sees the
/// sink's answer it is queued in the store; the store completes requests in submission order,
/// so a no-op checkpoint submitted now completes after it.
async fn checkpoint_settled(hub: &Hub, queue: &store::QueueName) -> Offset {
    hub.store.checkpoint(queue, Offset::ZERO).await.unwrap();
    hub.store.checkpoint_of(queue).unwrap()
}

#[tokio::test(start_paused = true)]
async fn every_message_reaches_a_recording_sink_in_order_and_is_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 10);
    let sink = RecordingSink::default();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    let sent = bodies("m", 100);
    hub.send_all("m", "o", &sent).await;
    sink.log.wait_delivered(100).await;
    assert_eq!(sink.log.delivered(), sent);
    let last = sink.log.seen().last().unwrap().offset;
    assert_eq!(checkpoint_settled(&hub, &upstream_queue(1)).await, last);
    let m = hub.dispatcher.metrics();
    assert_eq!((m.routed, m.delivered, m.retries), (100, 100, 0));
    assert!(sink.log.seen().iter().all(|s| s.priority == 1));
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn batches_never_exceed_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 7);
    let sent = bodies("m", 30);
    hub.send_all("m", "o", &sent).await;
    let sink = SlowSink::new(Duration::from_millis(5));
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(30).await;
    assert_eq!(sink.log.delivered(), sent);
    // Queued before the sink came: batches are full windows, the last one the remainder.
    let metrics = hub.dispatcher.metrics();
    assert_eq!(metrics.delivered, 30);
    hub.close().await;
}

/// Delivers everything and records the size of every batch.
#[derive(Clone, Default)]
struct BatchSizes {
    log: support::sinks::Log,
    sizes: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
}

impl router::Sink for BatchSizes {
    async fn send(&self, batch: Vec<router::Delivery>) -> Vec<router::DeliveryOutcome> {
        self.sizes.lock().unwrap().push(batch.len());
        let outcomes = vec![router::DeliveryOutcome::Delivered; batch.len()];
        self.log.record(&batch, &outcomes);
        outcomes
    }
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_policy_window_overrides_the_dispatchers() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 7);
    hub.send_all("m", "o", &bodies("a", 30)).await;
    let sink = BatchSizes::default();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(30).await;
    assert_eq!(*sink.sizes.lock().unwrap(), [7, 7, 7, 7, 2]);
    hub.dispatcher.unregister_sink(&Endpoint::Upstream);
    hub.dispatcher.set_policy(
        &Endpoint::Upstream,
        EndpointPolicy {
            window: Some(12),
            ..EndpointPolicy::default()
        },
    );
    hub.send_all("m", "o", &bodies("b", 30)).await;
    sink.sizes.lock().unwrap().clear();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(60).await;
    assert_eq!(*sink.sizes.lock().unwrap(), [12, 12, 6]);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn messages_stay_queued_until_a_sink_registers() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 100);
    let sent = bodies("m", 20);
    hub.send_all("m", "o", &sent).await;
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(hub.dispatcher.metrics().delivered, 0);
    assert_eq!(
        hub.store.checkpoint_of(&upstream_queue(1)),
        Some(Offset::ZERO)
    );
    let sink = RecordingSink::default();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(20).await;
    assert_eq!(sink.log.delivered(), sent);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_sink_is_offered_the_first_message_again_and_nothing_is_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 4);
    hub.send_all("m", "o", &bodies("m", 10)).await;
    let sink = FailingSink::default();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    // Five attempts of a four-message batch.
    sink.log.wait_offered(20).await;
    let seen = sink.log.seen();
    for attempt in seen.chunks(4).take(5) {
        let b: Vec<&str> = attempt.iter().map(|s| s.body.as_str()).collect();
        assert_eq!(b, ["m000", "m001", "m002", "m003"]);
    }
    assert_eq!(
        hub.store.checkpoint_of(&upstream_queue(1)),
        Some(Offset::ZERO)
    );
    let m = hub.dispatcher.metrics();
    assert_eq!(m.delivered, 0);
    assert!(m.retries >= 5, "{m:?}");
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_sink_backs_off_exponentially_between_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 1);
    hub.send_all("m", "o", &bodies("m", 1)).await;
    let sink = FailingSink::default();
    let start = tokio::time::Instant::now();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    let mut at = Vec::new();
    for n in 1..=5 {
        sink.log.wait_offered(n).await;
        at.push((tokio::time::Instant::now() - start).as_secs());
    }
    // Attempts at 0, then after 1, 2, 4, 8 s of backoff (the clock only moves via timers here).
    assert_eq!(at, [0, 1, 3, 7, 15]);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_new_sink_ends_the_backoff_meant_for_the_failing_one() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 1);
    hub.send_all("m", "o", &bodies("m", 1)).await;
    let failing = FailingSink::default();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, failing.clone());
    // Four failures: the worker is now in an 8 s backoff.
    failing.log.wait_offered(4).await;
    let replaced_at = tokio::time::Instant::now();
    let fresh = RecordingSink::default();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, fresh.clone());
    fresh.log.wait_delivered(1).await;
    assert!(
        tokio::time::Instant::now() - replaced_at < std::time::Duration::from_secs(1),
        "the new sink waited out the old one's backoff"
    );
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn wake_ends_the_backoff_and_keeps_the_sink() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 1);
    hub.send_all("m", "o", &bodies("m", 1)).await;
    let sink = RevivableSink::dead();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    // Four failures: the worker is now in an 8 s backoff.
    sink.log.wait_offered(4).await;
    sink.revive();
    let woken_at = tokio::time::Instant::now();
    hub.dispatcher.wake(&Endpoint::Upstream);
    sink.log.wait_delivered(1).await;
    assert!(
        tokio::time::Instant::now() - woken_at < std::time::Duration::from_secs(1),
        "wake did not end the backoff"
    );
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_partial_failure_resends_from_the_first_failed_message_without_gap_or_reorder() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 5);
    let sent = bodies("m", 12);
    hub.send_all("m", "o", &sent).await;
    // This sink delivers what follows a failure in the same batch: those become duplicates.
    let sink = PartialFailureSink::new(&["m002", "m007"], 2);
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(12).await;
    let mut last_outcome: HashMap<String, DeliveryOutcome> = HashMap::new();
    let mut expected = 0;
    for s in sink.log.seen() {
        let n: usize = s.body[1..].parse().unwrap();
        if n != expected {
            assert!(n < expected, "skipped forward to {}", s.body);
            assert!(
                matches!(last_outcome.get(&s.body), Some(DeliveryOutcome::Retry(_))),
                "resent {} although it had not failed",
                s.body
            );
        }
        last_outcome.insert(s.body.clone(), s.outcome.clone());
        expected = n + 1;
    }
    let distinct: std::collections::BTreeSet<String> = sink.log.delivered().into_iter().collect();
    assert_eq!(distinct.len(), 12);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_sink_that_stops_at_its_first_failure_gets_each_message_exactly_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 5);
    let sent = bodies("m", 12);
    hub.send_all("m", "o", &sent).await;
    let sink = PartialFailureSink::new(&["m002", "m007"], 2).stopping();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(12).await;
    assert_eq!(sink.log.delivered(), sent);
    assert_eq!(hub.dispatcher.metrics().retries, 4);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_stalled_sink_holds_delivery_and_shutdown_still_stops_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 3);
    hub.send_all("m", "o", &bodies("m", 10)).await;
    let sink = StalledSink::after(3);
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.wait_stalled().await;
    assert_eq!(sink.log.delivered(), ["m000", "m001", "m002"]);
    // Shutdown cancels the stalled send; it returns although the sink never answers.
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_revived_sink_gets_everything_queued_while_it_was_down_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 8);
    let sink = RevivableSink::dead();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    let sent = bodies("m", 20);
    hub.send_all("m", "o", &sent[..10]).await;
    sink.log.wait_offered(24).await;
    sink.revive();
    hub.send_all("m", "o", &sent[10..]).await;
    sink.log.wait_delivered(20).await;
    assert_eq!(sink.log.delivered(), sent);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_sink_sees_every_message_in_order_while_producers_keep_routing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 4);
    let sink = SlowSink::new(Duration::from_millis(50));
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    let sent = bodies("m", 40);
    for chunk in sent.chunks(5) {
        hub.send_all("m", "o", chunk).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sink.log.wait_delivered(40).await;
    assert_eq!(sink.log.delivered(), sent);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn fan_out_stores_once_and_every_endpoint_gets_its_copy_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(
        dir.path(),
        table(vec![
            upstream_route("up", "o", 0, Ttl::Infinite),
            route(
                "a",
                "FROM /messages/modules/m/* INTO BrokeredEndpoint('/modules/a/inputs/in')",
                3,
                Ttl::Infinite,
            ),
            route(
                "b",
                "FROM /messages/* INTO BrokeredEndpoint('/modules/b/inputs/in')",
                5,
                Ttl::Infinite,
            ),
        ]),
        config(10),
    );
    let sinks: Vec<(Endpoint, RecordingSink)> = [
        Endpoint::Upstream,
        module_input("a", "in"),
        module_input("b", "in"),
    ]
    .into_iter()
    .map(|e| (e, RecordingSink::default()))
    .collect();
    for (e, s) in &sinks {
        hub.dispatcher.register_sink(e, s.clone());
    }
    let sent = bodies("m", 25);
    hub.send_all("m", "o", &sent).await;
    for (_, s) in &sinks {
        s.log.wait_delivered(25).await;
        assert_eq!(s.log.delivered(), sent);
    }
    // Stored once: every endpoint saw the same offsets.
    let offsets = |s: &RecordingSink| s.log.seen().iter().map(|x| x.offset).collect::<Vec<_>>();
    assert_eq!(offsets(&sinks[0].1), offsets(&sinks[1].1));
    assert_eq!(offsets(&sinks[1].1), offsets(&sinks[2].1));
    assert_eq!(hub.store.stats().appends, 25);
    let m = hub.dispatcher.metrics();
    assert_eq!((m.routed, m.delivered), (25, 75));
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_priority_0_message_overtakes_a_waiting_priority_5_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(
        dir.path(),
        table(vec![
            upstream_route("bulk", "bulk", 5, Ttl::Infinite),
            upstream_route("urgent", "alarm", 0, Ttl::Infinite),
        ]),
        config(2),
    );
    let backlog = bodies("bulk", 8);
    hub.send_all("m", "bulk", &backlog).await;
    let sink = StalledSink::after(0);
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.wait_stalled().await;
    hub.send_all("m", "alarm", &["alarm".to_owned()]).await;
    sink.release();
    sink.log.wait_delivered(9).await;
    let delivered = sink.log.delivered();
    // The batch in flight finishes, then the urgent message goes before the rest.
    assert_eq!(&delivered[..3], ["bulk000", "bulk001", "alarm"]);
    assert_eq!(&delivered[3..], &backlog[2..]);
    let priorities: Vec<u32> = sink.log.seen().iter().map(|s| s.priority).collect();
    assert_eq!(&priorities[..3], [5, 5, 0]);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn an_urgent_message_goes_first_even_while_a_lower_priority_head_is_failing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(
        dir.path(),
        table(vec![
            upstream_route("bulk", "bulk", 5, Ttl::Infinite),
            upstream_route("urgent", "alarm", 0, Ttl::Infinite),
        ]),
        config(10),
    );
    hub.send_all("m", "bulk", &bodies("bulk", 3)).await;
    let sink = FailsUntilAlarm::default();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_offered(3).await;
    hub.send_all("m", "alarm", &["alarm".to_owned()]).await;
    sink.log.wait_delivered(4).await;
    assert_eq!(
        sink.log.delivered(),
        ["alarm", "bulk000", "bulk001", "bulk002"]
    );
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn expired_messages_are_dropped_and_counted_never_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(
        dir.path(),
        table(vec![
            upstream_route("short", "short", 1, Ttl::Seconds(10)),
            upstream_route("long", "long", 1, Ttl::Seconds(1000)),
        ]),
        config(100),
    );
    hub.send_all("m", "short", &bodies("s", 5)).await;
    hub.send_all("m", "long", &bodies("l", 5)).await;
    tokio::time::advance(Duration::from_secs(11)).await;
    let sink = RecordingSink::default();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(5).await;
    assert_eq!(sink.log.delivered(), bodies("l", 5));
    // The short-lived ones expired in the store itself (their only target), which counts them.
    let stats = hub.store.stats();
    let q = stats
        .queues
        .iter()
        .find(|q| q.name == upstream_queue(1))
        .unwrap();
    assert_eq!(q.expired, 5);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn each_endpoint_applies_its_own_ttl_to_the_shared_copy() {
    let dir = tempfile::tempdir().unwrap();
    let module = module_input("a", "in");
    let hub = Hub::open(
        dir.path(),
        table(vec![
            upstream_route("up", "o", 1, Ttl::Seconds(10)),
            route(
                "a",
                "FROM /messages/modules/m/* INTO BrokeredEndpoint('/modules/a/inputs/in')",
                1,
                Ttl::Seconds(100),
            ),
        ]),
        config(100),
    );
    let sent = bodies("m", 4);
    hub.send_all("m", "o", &sent).await;
    tokio::time::advance(Duration::from_secs(50)).await;
    hub.send_all("m", "o", &["marker".to_owned()]).await;
    let up = RecordingSink::default();
    let a = RecordingSink::default();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, up.clone());
    hub.dispatcher.register_sink(&module, a.clone());
    a.log.wait_delivered(5).await;
    assert_eq!(&a.log.delivered()[..4], sent);
    // Upstream's copies expired: its worker drops and counts them, and goes on to the marker.
    up.log.wait_delivered(1).await;
    assert_eq!(up.log.delivered(), ["marker"]);
    assert_eq!(hub.dispatcher.metrics().expired, 4);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_message_that_expires_while_its_sink_fails_is_dropped_and_the_queue_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(
        dir.path(),
        table(vec![
            upstream_route("short", "short", 1, Ttl::Seconds(30)),
            upstream_route("long", "long", 1, Ttl::Infinite),
        ]),
        config(1),
    );
    hub.send_all("m", "short", &["doomed".to_owned()]).await;
    hub.send_all("m", "long", &["kept".to_owned()]).await;
    let sink = PartialFailureSink::new(&["doomed"], u32::MAX as usize);
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(1).await;
    assert_eq!(sink.log.delivered(), ["kept"]);
    assert!(
        sink.log.seen().len() >= 2,
        "doomed was retried before it expired"
    );
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_rejected_message_is_set_aside_counted_and_delivery_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 3);
    let sent = bodies("m", 6);
    hub.send_all("m", "o", &sent).await;
    let sink = RejectingSink::new(&["m001", "m004"]);
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(4).await;
    assert_eq!(sink.log.delivered(), ["m000", "m002", "m003", "m005"]);
    let last = sink.log.seen().last().unwrap().offset;
    assert_eq!(checkpoint_settled(&hub, &upstream_queue(1)).await, last);
    let m = hub.dispatcher.metrics();
    assert_eq!((m.rejected, m.delivered, m.retries), (2, 4, 0));
    // Each was offered exactly once: a reject is final.
    assert_eq!(sink.log.seen().len(), 6);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn by_default_a_failing_head_of_line_holds_back_everything_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 10);
    hub.send_all("m", "o", &bodies("m", 5)).await;
    let sink = PartialFailureSink::new(&["m000"], 50);
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log
        .wait_until(|s| s.iter().filter(|x| x.body == "m000").count() >= 20)
        .await;
    // Later messages were delivered by the sink but never checkpointed: they are resent.
    assert_eq!(
        hub.store.checkpoint_of(&upstream_queue(1)),
        Some(Offset::ZERO)
    );
    assert_eq!(hub.dispatcher.metrics().set_aside, 0);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn set_aside_after_n_attempts_lets_the_queue_move_on() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 10);
    hub.dispatcher.set_policy(
        &Endpoint::Upstream,
        EndpointPolicy {
            set_aside_after: Some(3),
            ..EndpointPolicy::default()
        },
    );
    let sent = bodies("m", 5);
    hub.send_all("m", "o", &sent).await;
    let sink = PartialFailureSink::new(&["m001"], usize::MAX).stopping();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(4).await;
    let last = sink.log.seen().last().unwrap().offset;
    assert_eq!(checkpoint_settled(&hub, &upstream_queue(1)).await, last);
    let attempts = sink.log.seen().iter().filter(|s| s.body == "m001").count();
    assert_eq!(attempts, 3);
    assert_eq!(sink.log.delivered(), ["m000", "m002", "m003", "m004"]);
    let m = hub.dispatcher.metrics();
    // Two retries of m001, then m002 failed once behind it (this sink stops at a failure).
    assert_eq!((m.set_aside, m.retries), (1, 3));
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_mid_delivery_resumes_from_the_checkpoint_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let sent = bodies("m", 50);
    {
        let hub = upstream_hub(dir.path(), 7);
        hub.send_all("m", "o", &sent).await;
        let sink = StalledSink::after(20);
        hub.dispatcher
            .register_sink(&Endpoint::Upstream, sink.clone());
        sink.wait_stalled().await;
        assert_eq!(sink.log.delivered(), &sent[..20]);
        hub.close().await;
    }
    let hub = upstream_hub(dir.path(), 7);
    let sink = RecordingSink::default();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log
        .wait_until(|s| s.last().is_some_and(|x| x.body == "m049"))
        .await;
    let second = sink.log.delivered();
    // The second run starts at or before the first undelivered message, then goes in order.
    let start: usize = second[0][1..].parse().unwrap();
    assert!(
        start <= 20,
        "resumed at {start}, after undelivered messages"
    );
    assert_eq!(second, &sent[start..]);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn queues_of_an_endpoint_no_route_names_any_more_still_drain_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sent = bodies("m", 5);
    {
        let hub = Hub::open(
            dir.path(),
            table(vec![route(
                "a",
                "FROM /messages/* INTO BrokeredEndpoint('/modules/a/inputs/in')",
                4,
                Ttl::Infinite,
            )]),
            config(10),
        );
        hub.send_all("m", "o", &sent).await;
        hub.close().await;
    }
    let hub = Hub::open(dir.path(), table(vec![]), config(10));
    let sink = RecordingSink::default();
    hub.dispatcher
        .register_sink(&module_input("a", "in"), sink.clone());
    sink.log.wait_delivered(5).await;
    assert_eq!(sink.log.delivered(), sent);
    assert!(sink.log.seen().iter().all(|s| s.priority == 4));
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn reload_keeps_queued_messages_with_their_priority_and_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 100);
    let before = bodies("old", 5);
    hub.send_all("m", "o", &before).await;
    // The new table sends the same messages at another priority with a short TTL.
    hub.router
        .reload(table(vec![upstream_route("r", "o", 7, Ttl::Seconds(5))]));
    let after = bodies("new", 3);
    hub.send_all("m", "o", &after).await;
    tokio::time::advance(Duration::from_secs(60)).await;
    let sink = RecordingSink::default();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(5).await;
    // A marker behind the expired ones shows the worker has read past them.
    hub.router
        .reload(table(vec![upstream_route("r", "o", 7, Ttl::Infinite)]));
    hub.send_all("m", "o", &["marker".to_owned()]).await;
    sink.log.wait_delivered(6).await;
    // Old messages kept priority 1 and their infinite TTL; new ones expired at priority 7.
    let mut expected = before.clone();
    expected.push("marker".to_owned());
    assert_eq!(sink.log.delivered(), expected);
    assert!(sink.log.seen()[..5].iter().all(|s| s.priority == 1));
    let stats = hub.store.stats();
    let p7 = stats
        .queues
        .iter()
        .find(|q| q.name == upstream_queue(7))
        .unwrap();
    assert_eq!(p7.expired, 3);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_stored_message_that_cannot_be_decoded_is_set_aside_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 10);
    hub.send_all("m", "o", &["before".to_owned()]).await;
    let garbage = bytes::Bytes::from_static(b"\xffnot an envelope");
    hub.store
        .append(&[upstream_queue(1)], garbage, None)
        .await
        .unwrap();
    hub.send_all("m", "o", &["after".to_owned()]).await;
    let sink = RecordingSink::default();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(2).await;
    assert_eq!(sink.log.delivered(), ["before", "after"]);
    assert_eq!(hub.dispatcher.metrics().rejected, 1);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn unrouted_messages_are_counted_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 10);
    let outcome = hub
        .router
        .route(from_module("m", "elsewhere", "x"))
        .await
        .unwrap();
    assert_eq!(outcome, RouteOutcome::Unrouted);
    let m = hub.dispatcher.metrics();
    assert_eq!((m.unrouted, m.routed), (1, 0));
    assert_eq!(hub.store.stats().appends, 0);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn acks_complete_in_submission_order_with_increasing_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 10);
    let acks: Vec<_> = bodies("m", 30)
        .iter()
        .map(|b| hub.router.route(from_module("m", "o", b)))
        .collect();
    // Await the last first: the append was submitted at `route`, not at first poll.
    let mut offsets = Vec::new();
    for ack in acks.into_iter().rev() {
        match ack.await.unwrap() {
            RouteOutcome::Stored { offset, targets } => {
                assert_eq!(targets, 1);
                offsets.push(offset);
            }
            RouteOutcome::Unrouted => panic!("routed message reported unrouted"),
        }
    }
    offsets.reverse();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_sink_unregistered_mid_stream_leaves_the_rest_queued_for_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 4);
    let sent = bodies("m", 12);
    hub.send_all("m", "o", &sent).await;
    let first = StalledSink::after(4);
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, first.clone());
    first.wait_stalled().await;
    hub.dispatcher.unregister_sink(&Endpoint::Upstream);
    first.release();
    first.log.wait_delivered(8).await;
    let second = RecordingSink::default();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, second.clone());
    second.log.wait_delivered(4).await;
    let mut all = first.log.delivered();
    all.extend(second.log.delivered());
    assert_eq!(all, sent);
    hub.close().await;
}

/// A receiver that goes away removes its own sink only: the sink a newer receiver registered
/// since stays, and gets everything.
#[tokio::test(start_paused = true)]
async fn an_old_receiver_going_away_leaves_the_newer_receivers_sink() {
    let dir = tempfile::tempdir().unwrap();
    let hub = upstream_hub(dir.path(), 4);
    let old = RecordingSink::default();
    let old_arc: std::sync::Arc<dyn router::DynSink> = std::sync::Arc::new(old.clone());
    assert!(hub.dispatcher.register_dyn_sink_if(
        &Endpoint::Upstream,
        std::sync::Arc::clone(&old_arc),
        || true
    ));
    let new = RecordingSink::default();
    let new_arc: std::sync::Arc<dyn router::DynSink> = std::sync::Arc::new(new.clone());
    hub.dispatcher
        .register_dyn_sink(&Endpoint::Upstream, std::sync::Arc::clone(&new_arc));
    // The old receiver goes: its sink is no longer registered, so nothing is removed.
    assert!(!hub
        .dispatcher
        .unregister_sink_if(&Endpoint::Upstream, |s| std::sync::Arc::ptr_eq(s, &old_arc)));
    // A registration whose condition fails (a connection no longer current) changes nothing.
    assert!(!hub.dispatcher.register_dyn_sink_if(
        &Endpoint::Upstream,
        std::sync::Arc::clone(&old_arc),
        || false
    ));
    let sent = bodies("m", 6);
    hub.send_all("m", "o", &sent).await;
    new.log.wait_delivered(6).await;
    assert_eq!(new.log.delivered(), sent);
    assert!(old.log.delivered().is_empty());
    // The newer one goes: its own sink is removed.
    assert!(hub
        .dispatcher
        .unregister_sink_if(&Endpoint::Upstream, |s| std::sync::Arc::ptr_eq(s, &new_arc)));
    assert!(!hub
        .dispatcher
        .unregister_sink_if(&Endpoint::Upstream, |_| true));
    hub.close().await;
}

// ---------------------------------------------------------------------------------------------
// edgehub extensions: per-route head-of-line policy and live-first.

fn live_first(secs: u32) -> DeliveryOptions {
    DeliveryOptions {
        live_first_secs: Some(secs),
        ..DeliveryOptions::default()
    }
}

fn live_queue(priority: u32) -> store::QueueName {
    QueueId::in_lane(Endpoint::Upstream, Priority(priority), Lane::Live)
        .name()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_routes_set_aside_limit_applies_to_its_messages_only_and_others_stay_strict() {
    let dir = tempfile::tempdir().unwrap();
    let lenient = DeliveryOptions {
        set_aside_after: Some(2),
        ..DeliveryOptions::default()
    };
    let hub = Hub::open(
        dir.path(),
        table(vec![
            upstream_route("lenient", "lenient", 1, Ttl::Infinite).with_options(lenient),
            upstream_route("strict", "strict", 1, Ttl::Infinite),
        ]),
        config(10),
    );
    // One queue, fed by both routes: the lenient message is set aside after two attempts and
    // the queue moves on; the strict one behind it then holds the head of line for good.
    hub.send_all("m", "lenient", &["l-bad".to_owned(), "l-ok".to_owned()])
        .await;
    hub.send_all("m", "strict", &["s-bad".to_owned(), "s-ok".to_owned()])
        .await;
    let sink = PartialFailureSink::new(&["l-bad", "s-bad"], usize::MAX).stopping();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log
        .wait_until(|s| s.iter().filter(|x| x.body == "s-bad").count() >= 10)
        .await;
    let attempts = |b: &str| sink.log.seen().iter().filter(|s| s.body == b).count();
    assert_eq!(attempts("l-bad"), 2);
    assert_eq!(sink.log.delivered(), ["l-ok"]);
    let m = hub.dispatcher.metrics();
    assert_eq!(m.set_aside, 1);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_routes_limit_wins_over_the_endpoint_policy_and_the_endpoint_policy_covers_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let patient = DeliveryOptions {
        set_aside_after: Some(5),
        ..DeliveryOptions::default()
    };
    let hub = Hub::open(
        dir.path(),
        table(vec![
            upstream_route("patient", "patient", 1, Ttl::Infinite).with_options(patient),
            upstream_route("plain", "plain", 1, Ttl::Infinite),
        ]),
        config(10),
    );
    hub.dispatcher.set_policy(
        &Endpoint::Upstream,
        EndpointPolicy {
            set_aside_after: Some(2),
            ..EndpointPolicy::default()
        },
    );
    hub.send_all("m", "patient", &["p-bad".to_owned()]).await;
    hub.send_all("m", "plain", &["x-bad".to_owned(), "x-ok".to_owned()])
        .await;
    let sink = PartialFailureSink::new(&["p-bad", "x-bad"], usize::MAX).stopping();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(1).await;
    // p-bad had its route's five attempts, not the endpoint's two; x-bad, whose route sets
    // nothing, had the endpoint's two (its first failed try came behind p-bad's last).
    let attempts = |b: &str| sink.log.seen().iter().filter(|s| s.body == b).count();
    assert_eq!(attempts("p-bad"), 5);
    assert_eq!(sink.log.delivered(), ["x-ok"]);
    let m = hub.dispatcher.metrics();
    assert_eq!((m.set_aside, m.retries), (2, 4 + 1 + 1));
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn extensions_from_a_manifest_reach_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = r#"{
        "schemaVersion": "1.1",
        "storeAndForwardConfiguration": { "timeToLiveSecs": 7200 },
        "routes": {
            "r": { "route": "FROM /messages/modules/m/outputs/o INTO $upstream", "priority": 1,
                   "x-edgehub-setAsideAfter": 3, "x-edgehub-liveFirstSecs": 30 }
        }
    }"#;
    let config_ = router::parse_edge_hub_desired(manifest).unwrap();
    let hub = Hub::open(dir.path(), config_.routes, config(10));
    hub.send_all("m", "o", &bodies("m", 3)).await;
    // Stored in the live lane, not the backlog lane.
    let stats = hub.store.stats();
    let live = stats
        .queues
        .iter()
        .find(|q| q.name == live_queue(1))
        .unwrap();
    assert_eq!(live.undelivered, 3);
    let sink = PartialFailureSink::new(&["m001"], usize::MAX).stopping();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(2).await;
    assert_eq!(sink.log.delivered(), ["m000", "m002"]);
    let attempts = sink.log.seen().iter().filter(|s| s.body == "m001").count();
    assert_eq!(attempts, 3);
    hub.close().await;
}

/// Positions, in `delivered`, of the bodies starting with `prefix`, as (position, number).
fn lane_of(delivered: &[String], prefix: &str) -> Vec<(usize, usize)> {
    delivered
        .iter()
        .enumerate()
        .filter_map(|(i, b)| Some((i, b.strip_prefix(prefix)?.parse().ok()?)))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn live_first_fresh_messages_overtake_a_backlog_of_a_thousand_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(
        dir.path(),
        table(vec![
            upstream_route("telemetry", "t", 1, Ttl::Infinite).with_options(live_first(60)),
            upstream_route("bulk", "bulk", 1, Ttl::Infinite),
        ]),
        config(10),
    );
    // An outage: no sink while 1,000 telemetry messages and 100 bulk ones queue up.
    let old = bodies("old", 1000);
    hub.send_all("m", "t", &old).await;
    let bulk = bodies("bulk", 100);
    hub.send_all("m", "bulk", &bulk).await;
    tokio::time::advance(Duration::from_secs(120)).await;
    // The receiver comes back; it takes 10 ms per batch of 10.
    let sink = SlowSink::new(Duration::from_millis(10));
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(100).await;
    let fresh = bodies("new", 20);
    for chunk in fresh.chunks(5) {
        hub.send_all("m", "t", chunk).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    sink.log.wait_delivered(1120).await;
    let delivered = sink.log.delivered();
    // Nothing lost, nothing twice (no failure happened).
    assert_eq!(delivered.len(), 1120);
    let (old_lane, new_lane) = (lane_of(&delivered, "old"), lane_of(&delivered, "new"));
    let bulk_lane = lane_of(&delivered, "bulk");
    // Each lane in order.
    for lane in [&old_lane, &new_lane, &bulk_lane] {
        assert!(lane.windows(2).all(|w| w[0].1 + 1 == w[1].1), "{lane:?}");
    }
    assert_eq!((old_lane.len(), new_lane.len()), (1000, 20));
    // Every fresh message arrived before the backlog finished, within a few batches of being
    // sent.
    let last_old = old_lane.last().unwrap().0;
    assert!(new_lane.iter().all(|&(i, _)| i < last_old), "{new_lane:?}");
    // The aged telemetry was moved into the backlog lane behind the bulk messages already
    // there, so the backlog keeps the order in which messages entered it.
    assert!(bulk_lane.last().unwrap().0 < old_lane[0].0);
    let m = hub.dispatcher.metrics();
    assert_eq!((m.moved_to_backlog, m.delivered), (1000, 1120));
    // Both lanes are checkpointed to their end.
    checkpoint_settled(&hub, &upstream_queue(1)).await;
    checkpoint_settled(&hub, &live_queue(1)).await;
    let stats = hub.store.stats();
    for q in stats.queues {
        assert_eq!(q.undelivered, 0, "{}", q.name);
    }
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_live_message_that_waits_past_its_limit_joins_the_backlog_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open(
        dir.path(),
        table(vec![
            upstream_route("telemetry", "t", 1, Ttl::Infinite).with_options(live_first(5))
        ]),
        config(10),
    );
    hub.send_all("m", "t", &bodies("m", 3)).await;
    // The receiver fails for 30 s: the head ages while it is retried.
    let sink = RevivableSink::dead();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_offered(3).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    sink.revive();
    sink.log.wait_delivered(3).await;
    assert_eq!(sink.log.delivered(), bodies("m", 3));
    assert_eq!(hub.dispatcher.metrics().moved_to_backlog, 3);
    hub.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_mid_way_resumes_both_lanes_with_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    let routes = || {
        table(vec![
            upstream_route("telemetry", "t", 1, Ttl::Infinite).with_options(live_first(60))
        ])
    };
    let old = bodies("old", 1000);
    let fresh = bodies("new", 20);
    let first = {
        let hub = Hub::open(dir.path(), routes(), config(10));
        hub.send_all("m", "t", &old).await;
        tokio::time::advance(Duration::from_secs(120)).await;
        hub.send_all("m", "t", &fresh).await;
        // Stops mid-way through the live lane: 1,000 moved, 12 fresh delivered.
        let sink = StalledSink::after(12);
        hub.dispatcher
            .register_sink(&Endpoint::Upstream, sink.clone());
        sink.wait_stalled().await;
        assert_eq!(hub.dispatcher.metrics().moved_to_backlog, 1000);
        let delivered = sink.log.delivered();
        hub.close().await;
        delivered
    };
    assert_eq!(first, &fresh[..12]);
    let hub = Hub::open(dir.path(), routes(), config(10));
    let sink = RecordingSink::default();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log
        .wait_until(|s| s.last().is_some_and(|x| x.body == "old999"))
        .await;
    let second = sink.log.delivered();
    // The live lane resumes at or before its first undelivered message, then the backlog lane
    // from its start: each lane is a contiguous run, and together they cover everything.
    let new_lane = lane_of(&second, "new");
    let start = new_lane[0].1;
    assert!(start <= 12, "live lane resumed at {start}");
    assert_eq!(
        new_lane.iter().map(|&(_, n)| n).collect::<Vec<_>>(),
        (start..20).collect::<Vec<_>>()
    );
    let old_lane: Vec<usize> = lane_of(&second, "old").iter().map(|&(_, n)| n).collect();
    assert_eq!(old_lane, (0..1000).collect::<Vec<_>>());
    // Nothing was moved twice: the move was checkpointed before the restart.
    assert_eq!(hub.dispatcher.metrics().moved_to_backlog, 0);
    hub.close().await;
}

/// Issue 11 item 8: a live-lane read moves two aged messages, and the store refuses the first
/// one's copy (the quota has room for the second, smaller one only). Neither may then be both
/// moved and sent in place: before the fix the second copy was stored in the backlog lane while
/// the message was also sent from the live lane, so it was delivered twice with no failure.
#[tokio::test(start_paused = true)]
async fn a_refused_move_stores_no_copy_of_the_messages_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open_with(
        dir.path(),
        table(vec![
            upstream_route("telemetry", "t", 1, Ttl::Infinite).with_options(live_first(5))
        ]),
        config(10),
        store::StoreOptions {
            quota_bytes: 1 << 20,
            preallocate: false,
            reserve_bytes: 0,
            ..store::StoreOptions::default()
        },
    );
    let big = format!("big{}", "#".repeat(8000));
    let sent = vec![big.clone(), "small".to_owned()];
    hub.send_all("m", "t", &sent).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    // Fill the quota up to about 2,000 bytes: room for the small copy, not for the big one.
    let filler = store::QueueName::new("filler").unwrap();
    let append = |len: usize| {
        hub.store
            .append(std::slice::from_ref(&filler), vec![b'f'; len].into(), None)
    };
    append(1).await.unwrap();
    let room = (1u64 << 20) - hub.store.stats().bytes_on_disk;
    // A message costs its body, a 31-byte entry and a 24-byte frame header.
    append(usize::try_from(room - 55 - 2000).unwrap())
        .await
        .unwrap();
    let room = (1u64 << 20) - hub.store.stats().bytes_on_disk;
    assert!((1500..=2000).contains(&room), "room {room}");

    let sink = RecordingSink::default();
    hub.dispatcher
        .register_sink(&Endpoint::Upstream, sink.clone());
    sink.log.wait_delivered(2).await;
    // Every copy the move submitted has been answered by now (the store answers in order).
    checkpoint_settled(&hub, &live_queue(1)).await;
    let backlog = hub
        .store
        .stats()
        .queues
        .into_iter()
        .find(|q| q.name == upstream_queue(1));
    assert!(
        backlog.as_ref().is_none_or(|q| q.tail == Offset::ZERO),
        "a copy was stored in the backlog lane although the message was sent in place: {backlog:?}"
    );
    assert_eq!(sink.log.delivered(), sent);
    assert_eq!(hub.dispatcher.metrics().moved_to_backlog, 0);
    hub.close().await;
}
