//! A body read ahead: the frames already taken from a body, then the rest
//! of it. The load shedder reads a request this way before it gives the
//! call a place (`shed`), and the listener a response before it is sent
//! (`app::send`), so that neither holds anything while waiting on the
//! client's bytes or window.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http_body::{Body as _, Frame, SizeHint};
use prost::bytes::{Buf, Bytes};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, body::Body};

/// One frame of a body, or its error.
pub type Item = Result<Frame<Bytes>, Status>;

/// The frames read ahead from a body, then the rest of it (none once it
/// has ended or failed).
pub struct Replay {
    ready: VecDeque<Item>,
    rest: Option<Body>,
}

impl Replay {
    /// Reads `body` as far as it is ready now, without waiting.
    pub async fn read_ready(body: Body) -> Self {
        let mut replay = Self::new(body);
        std::future::poll_fn(|cx| {
            while let Poll::Ready(true) = replay.read_one(cx, usize::MAX) {}
            Poll::Ready(())
        })
        .await;
        replay
    }

    /// Reads the body until it ends, fails, or more than `limit` bytes of
    /// data have been read or announced (by the gRPC frame header of its
    /// first message), waiting for them: ready with whether it stayed
    /// within `budget`. While it waits, the bytes it holds are counted
    /// against `budget` (a permit a byte, kept in `held` between polls;
    /// the caller drops it once ready), shared by every body read ahead;
    /// when the budget cannot cover them it stops, ready with `false`. A
    /// body that arrives whole, or that waits holding nothing, takes
    /// nothing from the budget.
    pub fn poll_read_until(
        &mut self,
        cx: &mut Context<'_>,
        limit: usize,
        budget: &Arc<Semaphore>,
        held: &mut Option<OwnedSemaphorePermit>,
    ) -> Poll<bool> {
        loop {
            match self.read_one(cx, limit) {
                Poll::Ready(true) => {}
                Poll::Ready(false) => return Poll::Ready(true),
                Poll::Pending => {
                    let holding = held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
                    let needed = self.buffered().saturating_sub(holding);
                    if needed > 0 {
                        let more = u32::try_from(needed)
                            .ok()
                            .and_then(|n| Arc::clone(budget).try_acquire_many_owned(n).ok());
                        match (more, held.as_mut()) {
                            (Some(more), Some(held)) => held.merge(more),
                            (Some(more), None) => *held = Some(more),
                            (None, _) => return Poll::Ready(false),
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// `body`, nothing read yet.
    pub fn new(body: Body) -> Self {
        Self {
            // Allocates only once a frame is kept.
            ready: VecDeque::new(),
            rest: Some(body),
        }
    }

    /// Whether the body has been read to its end.
    #[cfg(test)]
    fn is_whole(&self) -> bool {
        self.rest.is_none()
    }

    /// Reads one more frame: whether to go on reading (there may be more,
    /// and no more than `limit` bytes have been read).
    fn read_one(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<bool> {
        if self.buffered() > limit || self.announced().is_some_and(|len| len > limit) {
            return Poll::Ready(false);
        }
        let Some(body) = self.rest.as_mut() else {
            return Poll::Ready(false);
        };
        if body.is_end_stream() {
            self.rest = None;
            return Poll::Ready(false);
        }
        match Pin::new(body).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.rest = None;
                Poll::Ready(false)
            }
            Poll::Ready(Some(item)) => {
                // A body that failed is not polled again.
                let failed = item.is_err();
                self.ready.push_back(item);
                if failed {
                    self.rest = None;
                }
                Poll::Ready(!failed)
            }
        }
    }

    /// The length of the first gRPC message with its 5-byte frame header
    /// (a flag and a 32-bit big-endian length), once that header has been
    /// read.
    fn announced(&self) -> Option<usize> {
        let mut header = [0_u8; 5];
        let mut filled = 0;
        for item in &self.ready {
            let Some(data) = item.as_ref().ok().and_then(Frame::data_ref) else {
                continue;
            };
            let take = data.len().min(header.len() - filled);
            header[filled..filled + take].copy_from_slice(&data[..take]);
            filled += take;
            if filled == header.len() {
                let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                return Some((len as usize).saturating_add(header.len()));
            }
        }
        None
    }

    /// The bytes of data read ahead and not yet taken.
    fn buffered(&self) -> usize {
        self.ready
            .iter()
            .filter_map(|item| item.as_ref().ok()?.data_ref().map(Buf::remaining))
            .sum()
    }
}

/// The frames' count only: a body's bytes (a credential, a password)
/// never reach a `Debug` print.
impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("frames_read_ahead", &self.ready.len())
            .field("whole", &self.rest.is_none())
            .finish()
    }
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let this = self.get_mut();
        if let Some(item) = this.ready.pop_front() {
            if this.ready.is_empty() && this.rest.as_ref().is_some_and(Body::is_end_stream) {
                this.rest = None;
            }
            return Poll::Ready(Some(item));
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let item = std::task::ready!(Pin::new(rest).poll_frame(cx));
        let ended = match &item {
            None | Some(Err(_)) => true,
            Some(Ok(_)) => this.rest.as_ref().is_some_and(Body::is_end_stream),
        };
        if ended {
            this.rest = None;
        }
        Poll::Ready(item)
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_empty() && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let ready = self.buffered() as u64;
        match &self.rest {
            None => SizeHint::with_exact(ready),
            Some(rest) => {
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(ready));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(ready));
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;

    use super::*;

    /// A body whose frames are each ready at once.
    struct Frames(VecDeque<Item>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Item>> {
            Poll::Ready(self.get_mut().0.pop_front())
        }
    }

    /// A body of `parts`, then the trailers if `trailers`.
    fn body(parts: &[&'static [u8]], trailers: bool) -> Body {
        let mut frames: VecDeque<Item> = parts
            .iter()
            .map(|part| Ok(Frame::data(Bytes::from_static(part))))
            .collect();
        if trailers {
            frames.push_back(Ok(Frame::trailers(http::HeaderMap::new())));
        }
        Body::new(Frames(frames))
    }

    impl Replay {
        /// `poll_read_until` as a future: `Err` when over the budget.
        async fn read_until(
            body: Body,
            limit: usize,
            budget: &Arc<Semaphore>,
        ) -> Result<Self, Self> {
            let mut replay = Self::new(body);
            let mut held = None;
            let within =
                std::future::poll_fn(|cx| replay.poll_read_until(cx, limit, budget, &mut held))
                    .await;
            if within { Ok(replay) } else { Err(replay) }
        }
    }

    fn budget() -> Arc<Semaphore> {
        Arc::new(Semaphore::new(0))
    }

    async fn drain(mut body: Replay) -> (Vec<u8>, bool) {
        let mut data = Vec::new();
        let mut trailers = false;
        while let Some(item) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            let frame = item.expect("a frame");
            if let Some(chunk) = frame.data_ref() {
                data.extend_from_slice(chunk);
            } else {
                trailers = true;
            }
        }
        assert!(body.is_end_stream());
        (data, trailers)
    }

    #[tokio::test]
    async fn a_body_read_ahead_replays_every_frame_in_order() {
        for trailers in [false, true] {
            let whole = Replay::read_ready(body(&[b"ab", b"cd", b"e"], trailers)).await;
            assert!(whole.is_whole());
            assert_eq!(whole.size_hint().exact(), Some(5));
            assert_eq!(drain(whole).await, (b"abcde".to_vec(), trailers));
            // Stopped early: the rest follows what was read.
            let part = Replay::read_until(body(&[b"ab", b"cd", b"e"], trailers), 1, &budget())
                .await
                .expect("within the budget");
            assert!(!part.is_whole());
            assert_eq!(drain(part).await, (b"abcde".to_vec(), trailers));
        }
    }

    #[tokio::test]
    async fn reading_ahead_stops_at_a_message_announced_too_long() {
        // A frame header announcing 1,000 bytes, split across frames.
        let header: &'static [u8] = &[0, 0, 0];
        let rest: &'static [u8] = &[3, 232];
        let announced =
            Replay::read_until(body(&[header, rest, b"xy", b"z"], false), 100, &budget())
                .await
                .expect("within the budget");
        assert!(!announced.is_whole());
        let (data, _) = drain(announced).await;
        assert_eq!(data, [0, 0, 0, 3, 232, b'x', b'y', b'z']);
        // Within the limit, it is read to the end.
        let small: &'static [u8] = &[0, 0, 0, 0, 3];
        let within = Replay::read_until(body(&[small, b"abc"], true), 100, &budget())
            .await
            .expect("within the budget");
        assert!(within.is_whole());
    }
}
