//! The link's bookkeeping, apart from its I/O (as rumqttc keeps `state.rs` apart from its event
//! loop): whether it is connected, the reconnect back-off, which outbox event each publish
//! carries and which acknowledgement delivers it, and what to publish after an event.
//!
//! The link asks for a clean session, so on every (re)connect the broker keeps nothing and
//! rumqttc drops the publishes it had not finished (`EventLoop::poll` clears its pending queue
//! when the CONNACK says no session is present). The bookkeeping forgets them too and starts the
//! outbox again from the store, where undelivered events stay until acknowledged: an event in
//! flight at an outage is published again, never lost.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use crate::protocol::events::EventKind;

/// Events published but not yet acknowledged, at most.
pub const EVENT_WINDOW: usize = 64;

/// What the I/O loop does when the broker accepts the connection, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum OnConnect {
    SubscribeCommands,
    /// The retained status, online, with this reason.
    PublishStatus(&'static str),
}

/// What to publish after an event, besides the event itself.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FollowUp {
    /// The retained status, because the served version changed.
    pub status: bool,
    /// The promoted version's weights set.
    pub weights: bool,
}

/// What the I/O loop fetches from the outbox next.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRequest {
    /// Acknowledged events the store could not mark before; marked first.
    pub remark: Vec<i64>,
    /// Events after this id...
    pub after: i64,
    /// ...at most this many.
    pub room: usize,
}

/// After a connection error: how long to wait before trying again, and whether to say so (the
/// first failure after being connected, or the first attempt, is logged; the retries are not).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retry {
    pub delay: Duration,
    pub log: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LinkState {
    connected: bool,
    failures: u32,
    backoff: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
    /// One entry per publish handed to the client and not yet seen leaving: the event it carries.
    queued: VecDeque<Option<i64>>,
    awaiting_ack: HashMap<u16, i64>,
    in_flight: BTreeSet<i64>,
    /// Highest event id published on this connection.
    published_up_to: i64,
    /// Events the broker acknowledged but the store could not mark (a full disk, say). The outbox
    /// only looks past `published_up_to`, so they are marked again before the next fetch.
    unmarked: BTreeSet<i64>,
}

impl LinkState {
    /// Disconnected, with a back-off that starts at `min` and doubles up to `max`.
    pub fn new(min: Duration, max: Duration) -> LinkState {
        LinkState {
            connected: false,
            failures: 0,
            backoff: min,
            min_backoff: min,
            max_backoff: max.max(min),
            queued: VecDeque::new(),
            awaiting_ack: HashMap::new(),
            in_flight: BTreeSet::new(),
            published_up_to: 0,
            unmarked: BTreeSet::new(),
        }
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    /// The broker accepted the connection (a clean session: nothing of the last one survives).
    pub fn on_connected(&mut self) -> [OnConnect; 2] {
        self.forget_connection();
        self.connected = true;
        self.failures = 0;
        self.backoff = self.min_backoff;
        [OnConnect::SubscribeCommands, OnConnect::PublishStatus("started")]
    }

    /// The connection failed or could not be made. `jitter` in [0.5, 1) spreads a fleet's
    /// reconnects after a broker restart.
    pub fn on_connection_error(&mut self, jitter: f64) -> Retry {
        let log = self.connected || self.failures == 0;
        self.connected = false;
        self.forget_connection();
        self.failures = self.failures.saturating_add(1);
        let delay = self.backoff.mul_f64(jitter.clamp(0.0, 1.0));
        self.backoff = (self.backoff * 2).min(self.max_backoff);
        Retry { delay, log }
    }

    /// A publish was handed to the client; `event` is the outbox event it carries, if any.
    pub fn on_queued(&mut self, event: Option<i64>) {
        self.queued.push_back(event);
        if let Some(id) = event {
            self.in_flight.insert(id);
            self.published_up_to = self.published_up_to.max(id);
        }
    }

    /// The client sent the oldest queued publish with packet id `pkid` (0 for QoS 0).
    pub fn on_outgoing_publish(&mut self, pkid: u16) {
        if let Some(Some(id)) = self.queued.pop_front()
            && pkid != 0
        {
            self.awaiting_ack.insert(pkid, id);
        }
    }

    /// The broker acknowledged packet `pkid`: the event to mark delivered, if it carried one.
    pub fn on_puback(&mut self, pkid: u16) -> Option<i64> {
        let id = self.awaiting_ack.remove(&pkid)?;
        self.in_flight.remove(&id);
        Some(id)
    }

    /// The store could not mark these acknowledged events delivered; try again later.
    pub fn on_mark_failed(&mut self, ids: &[i64]) {
        self.unmarked.extend(ids);
    }

    /// What to fetch from the outbox now, or `None` when disconnected or the window is full.
    /// Takes the events to mark again: hand them back with `on_mark_failed` if that fails.
    pub fn outbox_request(&mut self) -> Option<OutboxRequest> {
        let room = EVENT_WINDOW.saturating_sub(self.in_flight.len());
        if !self.connected || room == 0 {
            return None;
        }
        let remark = std::mem::take(&mut self.unmarked).into_iter().collect();
        Some(OutboxRequest { remark, after: self.published_up_to, room })
    }

    /// Undelivered events that were published on this connection and not yet acknowledged.
    pub fn in_flight(&self) -> impl Iterator<Item = i64> + '_ {
        self.in_flight.iter().copied()
    }

    fn forget_connection(&mut self) {
        self.queued.clear();
        self.awaiting_ack.clear();
        self.in_flight.clear();
        self.published_up_to = 0;
    }
}

/// What follows an event of `kind`: the retained status always names the version served, and a
/// promoted version's weights go out after its event.
pub fn follow_up(kind: &str) -> FollowUp {
    match EventKind::parse(kind) {
        Some(kind) => FollowUp { status: kind.changes_served_version(), weights: kind == EventKind::VersionPromoted },
        None => FollowUp::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> LinkState {
        LinkState::new(Duration::from_millis(100), Duration::from_millis(1000))
    }

    fn connected() -> LinkState {
        let mut state = state();
        state.on_connected();
        state
    }

    /// Queues event `id` and sees it leave with packet id `pkid`.
    fn publish_event(state: &mut LinkState, id: i64, pkid: u16) {
        state.on_queued(Some(id));
        state.on_outgoing_publish(pkid);
    }

    #[test]
    fn connecting_subscribes_then_announces_and_opens_the_outbox_from_the_start() {
        let mut state = state();
        assert_eq!(state.outbox_request(), None, "no outbox before the broker accepts");
        let actions = state.on_connected();
        assert_eq!(actions, [OnConnect::SubscribeCommands, OnConnect::PublishStatus("started")]);
        assert_eq!(state.outbox_request(), Some(OutboxRequest { remark: vec![], after: 0, room: EVENT_WINDOW }));
    }

    #[test]
    fn an_acknowledgement_delivers_the_event_its_packet_carried() {
        let mut state = connected();
        publish_event(&mut state, 7, 1);
        state.on_queued(None); // a status publish between events
        state.on_outgoing_publish(2);
        publish_event(&mut state, 8, 3);
        assert_eq!(state.on_puback(2), None, "the status carried no event");
        assert_eq!(state.on_puback(3), Some(8));
        assert_eq!(state.on_puback(1), Some(7));
        assert_eq!(state.on_puback(1), None, "a duplicate acknowledgement delivers nothing twice");
        assert_eq!(state.in_flight().count(), 0);
    }

    #[test]
    fn the_outbox_continues_after_the_last_event_published_and_respects_the_window() {
        let mut state = connected();
        for id in 1..=EVENT_WINDOW as i64 {
            publish_event(&mut state, id, id as u16);
        }
        assert_eq!(state.outbox_request(), None, "the window is full");
        assert_eq!(state.on_puback(5), Some(5));
        let request = state.outbox_request().unwrap();
        assert_eq!((request.after, request.room), (EVENT_WINDOW as i64, 1));
    }

    #[test]
    fn an_event_marked_in_vain_is_marked_again_before_the_next_fetch() {
        let mut state = connected();
        publish_event(&mut state, 3, 1);
        let id = state.on_puback(1).unwrap();
        state.on_mark_failed(&[id]);
        let request = state.outbox_request().unwrap();
        assert_eq!(request.remark, vec![3]);
        assert_eq!(request.after, 3, "the event is not published again");
        state.on_mark_failed(&request.remark);
        assert_eq!(state.outbox_request().unwrap().remark, vec![3], "kept until the store takes it");
        assert!(state.outbox_request().unwrap().remark.is_empty(), "taken once the store marked it");
    }

    #[test]
    fn a_reconnect_with_events_in_flight_publishes_them_again_and_ignores_stale_acknowledgements() {
        let mut state = connected();
        publish_event(&mut state, 10, 1);
        publish_event(&mut state, 11, 2);
        state.on_queued(Some(12)); // handed to the client, never sent
        assert_eq!(state.on_puback(1), Some(10));
        state.on_connection_error(0.5);
        assert!(!state.connected());
        assert_eq!(state.outbox_request(), None, "nothing is published while disconnected");
        state.on_connected();
        assert_eq!(state.in_flight().count(), 0);
        assert_eq!(
            state.outbox_request().unwrap().after,
            0,
            "the outbox starts again from the store, so 11 and 12 go out again"
        );
        assert_eq!(state.on_puback(2), None, "an acknowledgement from the old session delivers nothing");
        // The first publish on the new connection maps to its own event, not to the lost 12.
        publish_event(&mut state, 11, 1);
        assert_eq!(state.on_puback(1), Some(11));
    }

    #[test]
    fn an_event_marked_in_vain_survives_a_reconnect() {
        let mut state = connected();
        publish_event(&mut state, 4, 1);
        state.on_puback(1);
        state.on_mark_failed(&[4]);
        state.on_connection_error(0.7);
        state.on_connected();
        assert_eq!(state.outbox_request().unwrap().remark, vec![4]);
    }

    #[test]
    fn back_off_doubles_up_to_its_ceiling_with_jitter_and_resets_on_connect() {
        let mut state = state();
        let delays: Vec<u64> = (0..6).map(|_| state.on_connection_error(1.0).delay.as_millis() as u64).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(state.on_connection_error(0.5).delay, Duration::from_millis(500));
        state.on_connected();
        assert_eq!(state.on_connection_error(0.5).delay, Duration::from_millis(50));
    }

    #[test]
    fn only_the_first_failure_of_an_outage_is_logged() {
        let mut state = state();
        let logged: Vec<bool> = (0..3).map(|_| state.on_connection_error(1.0).log).collect();
        assert_eq!(logged, vec![true, false, false]);
        state.on_connected();
        let logged: Vec<bool> = (0..2).map(|_| state.on_connection_error(1.0).log).collect();
        assert_eq!(logged, vec![true, false]);
    }

    #[test]
    fn a_qos0_publish_is_never_awaited() {
        let mut state = connected();
        state.on_queued(Some(1));
        state.on_outgoing_publish(0);
        assert_eq!(state.on_puback(0), None);
    }

    #[test]
    fn version_changes_republish_the_status_and_a_promotion_its_weights() {
        assert_eq!(follow_up("version.promoted"), FollowUp { status: true, weights: true });
        assert_eq!(follow_up("version.rollback"), FollowUp { status: true, weights: false });
        assert_eq!(follow_up("version.load_failed"), FollowUp { status: true, weights: false });
        assert_eq!(follow_up("version.rejected"), FollowUp::default());
        assert_eq!(follow_up("sample.ingested"), FollowUp::default());
        assert_eq!(follow_up("something.new"), FollowUp::default());
    }
}
