//! Sending responses, with what a client that does not take them in can
//! hold bounded.
//!
//! - **A response is produced before it is sent.** The listener reads a
//!   response body as far as it is ready (a unary call's: all of it, its
//!   message and its trailers) as soon as the handler has answered, so
//!   everything inside the stack that a call holds until its body ends (a
//!   shed permit, the call's log line) is given back then, not once the
//!   client has taken the bytes in. HTTP/2 asks a body for its next frame
//!   only when the client has granted flow-control window for it; a client
//!   that grants none would otherwise keep each of its calls' permits for
//!   as long as it liked, and 8 connections of 128 such calls took all
//!   1,024 of them.
//! - **A response the client does not take in ends its connection.** A
//!   response is *waiting on the client* from the moment it was answered
//!   or gave the connection a frame until HTTP/2 asks it for the next one.
//!   Each connection keeps two counters of its waiting responses, by the
//!   period of [`Stalls::turn`] they began waiting in; when a period ends
//!   with responses still waiting from the one before, they have waited
//!   at least a whole period and at most two, and the connection is closed
//!   (counted in [`super::listen::STALLED`]). A stream that is open with
//!   nothing to send (a health `Watch` with no change) is not waiting:
//!   HTTP/2 has asked it for a frame and it has none yet. What this does
//!   not see: HTTP/2 asks for the next frame once the client has granted
//!   one byte of window, so a client that grants a byte or two hands the
//!   whole response to h2's send buffer, where it waits unseen; the
//!   connection, with no call in flight, then lasts until its idle timeout.
//!   It holds no permit by then, only its own stream slots and the unsent
//!   bytes.
//!
//! On a call, this costs two atomic additions per frame, on counters of
//! its own connection, and no lock. The web page's listener needs none of
//! it: a page holds nothing once it is produced, and its connections close
//! when idle.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use http_body::SizeHint;
use prost::bytes::Bytes;
use tonic::{Status, body::Body};

use super::listen::InFlight;
use crate::api::layers::replay::{Item, Replay};

/// The shortest period of [`Stalls::turn`]: a response must be able to
/// wait on a loaded machine for longer than a scheduling hiccup.
pub(super) const MIN_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// One connection's responses waiting on the client, counted by the period
/// they began waiting in (its parity).
#[derive(Debug, Default)]
pub(super) struct Stalls {
    period: AtomicUsize,
    waiting: [AtomicUsize; 2],
}

impl Stalls {
    /// Ends the current period: `true` if a response has been waiting on
    /// the client since the period before it (so for at least one whole
    /// period), and the connection should be closed.
    pub(super) fn turn(&self) -> bool {
        let next = self.period.load(Ordering::Acquire).wrapping_add(1);
        // The counter `next` will use still counts the period before the
        // current one.
        if self.waiting[next & 1].load(Ordering::Acquire) > 0 {
            return true;
        }
        self.period.store(next, Ordering::Release);
        false
    }
}

/// Whether one response is waiting on the client, and since which period.
struct Waiting {
    stalls: Arc<Stalls>,
    since: Option<usize>,
}

impl Waiting {
    fn begin(&mut self) {
        if self.since.is_none() {
            let parity = self.stalls.period.load(Ordering::Acquire) & 1;
            self.stalls.waiting[parity].fetch_add(1, Ordering::AcqRel);
            self.since = Some(parity);
        }
    }

    fn end(&mut self) {
        if let Some(parity) = self.since.take() {
            self.stalls.waiting[parity].fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.end();
    }
}

/// A response body on its way to the client: read ahead as far as it was
/// ready, with the call counted in flight on its connection until the body
/// is done, and waiting on the client whenever it has given HTTP/2 a frame
/// and not yet been asked for the next.
pub(super) struct Sending {
    body: Replay,
    waiting: Waiting,
    _call: InFlight,
}

impl Sending {
    /// Reads `body` as far as it is ready, dropping it if it ended (and
    /// with it whatever it held), and counts the response waiting on the
    /// client, for `stalls`, until HTTP/2 first asks it for a frame.
    pub(super) async fn produce(body: Body, stalls: Arc<Stalls>, call: InFlight) -> Self {
        let body = Replay::read_ready(body).await;
        let mut waiting = Waiting {
            stalls,
            since: None,
        };
        waiting.begin();
        Self {
            body,
            waiting,
            _call: call,
        }
    }
}

impl http_body::Body for Sending {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let this = self.get_mut();
        this.waiting.end();
        let item = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if item.is_some() {
            this.waiting.begin();
        }
        Poll::Ready(item)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(stalls: &Arc<Stalls>) -> Waiting {
        let mut waiting = Waiting {
            stalls: Arc::clone(stalls),
            since: None,
        };
        waiting.begin();
        waiting
    }

    #[test]
    fn a_response_is_stalled_once_it_has_waited_a_whole_period() {
        let stalls = Arc::new(Stalls::default());
        let early = waiting(&stalls);
        // The period it began in ends: it may have begun just before.
        assert!(!stalls.turn());
        // A response that began in the second period and ended.
        drop(waiting(&stalls));
        // The second period ends: the first response has waited all of it.
        assert!(stalls.turn());
        // Still, while it waits.
        assert!(stalls.turn());
        drop(early);
        assert!(!stalls.turn());
    }

    #[test]
    fn responses_that_are_taken_in_are_never_stalled() {
        let stalls = Arc::new(Stalls::default());
        for _ in 0..10 {
            let mut one = waiting(&stalls);
            one.end();
            // Ending twice, or dropping after ending, counts once.
            one.end();
            drop(one);
            let _young = waiting(&stalls);
            assert!(!stalls.turn());
        }
        // Every response that began has ended.
        assert!(!stalls.turn());
        assert!(!stalls.turn());
        assert_eq!(stalls.waiting[0].load(Ordering::Relaxed), 0);
        assert_eq!(stalls.waiting[1].load(Ordering::Relaxed), 0);
    }
}
