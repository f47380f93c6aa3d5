//! rumqttd's connection ids are slab slots, reused as soon as they are
//! freed. A link the router has already dropped (its client id was taken
//! over by a new connection) can still report "my network closed" a moment
//! later; by then its slot may belong to another client. That late
//! disconnect must not disconnect the other client. In the load test's
//! reconnect storm it did, over and over: ~500 of 10,000 agents stayed out
//! for 600 s (loadtest/RESULTS.md, broker/vendor/PATCHES.md).
//!
//! The race is between a link's network read and the router's drop, so it
//! is driven here through the router's own links, in the order the storm
//! produced it.

use std::time::Duration;

use rumqttd::local::LinkBuilder;
use rumqttd::{Notification, Router, RouterConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_disconnect_from_a_dropped_link_spares_the_slots_new_owner() {
    let router_tx = Router::new(
        0,
        RouterConfig {
            max_connections: 10,
            max_outgoing_packet_count: 100,
            max_segment_size: 1024 * 1024,
            max_segment_count: 2,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
    )
    .spawn();
    let link = |id: &str| {
        LinkBuilder::new(id, router_tx.clone())
            .clean_session(true)
            .build()
            .expect("link")
    };
    // Subscribes `rx` to `filter` and waits for the SUBACK.
    async fn subscribed(
        tx: &mut rumqttd::local::LinkTx,
        rx: &mut rumqttd::local::LinkRx,
        filter: &str,
    ) {
        tx.subscribe(filter).expect("subscribe");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, rx.next()).await {
                Ok(Ok(Some(Notification::DeviceAck(_)))) => return,
                Ok(Ok(_)) => {}
                other => panic!("no SUBACK on {filter}: {other:?}"),
            }
        }
    }
    // Whether a publish on `topic` reaches `rx`: fails the test if `rx`'s
    // connection was closed.
    async fn reaches(
        from: &mut rumqttd::local::LinkTx,
        rx: &mut rumqttd::local::LinkRx,
        topic: &str,
        who: &str,
    ) {
        from.publish(topic.to_string(), "still here")
            .expect("publish");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, rx.next()).await {
                Ok(Ok(Some(Notification::Forward(f)))) => {
                    assert_eq!(f.publish.payload.as_ref(), b"still here");
                    return;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{who} was disconnected by a stale link's disconnect: {e}"),
                Err(_) => panic!("{who} got nothing: disconnected by a stale link's disconnect?"),
            }
        }
    }

    // Client x connects (link A), then again (link B): the router drops A,
    // frees its slot and gives it to B.
    let (a_tx, a_rx, _) = link("x");
    let (mut b_tx, mut b_rx, _) = link("x");
    assert_eq!(b_rx.id(), a_rx.id(), "precondition: B got A's slot");
    let (mut o_tx, _o_rx, _) = link("other");
    subscribed(&mut b_tx, &mut b_rx, "t/x").await;
    // A's network "closes" now, after the router dropped it: B, x's live
    // connection, must stay.
    a_tx.link_gone().expect("router running");
    reaches(&mut o_tx, &mut b_rx, "t/x", "x's new connection").await;

    // B's own disconnect works: the slot is freed (events are handled in
    // the order sent) and the next client, y, gets it.
    b_tx.link_gone().expect("router running");
    let (mut c_tx, mut c_rx, _) = link("y");
    assert_eq!(c_rx.id(), a_rx.id(), "B's disconnect did not free its slot");
    subscribed(&mut c_tx, &mut c_rx, "t/y").await;
    // A late disconnect from A or B must not touch y.
    a_tx.link_gone().expect("router running");
    b_tx.link_gone().expect("router running");
    reaches(&mut o_tx, &mut c_rx, "t/y", "y").await;
}
