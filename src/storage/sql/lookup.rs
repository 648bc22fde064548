//! The cold path's lookups by digest, batched: the misses of the hot path
//! (`token_by_digest`, `session_by_digest`) that wait at the same moment go
//! to the database together, in one statement per kind, on a few
//! connections this module holds for good.
//!
//! Each of `connections` workers owns one connection, opened from the
//! pool's own connect options (so outside the pool's count, and never
//! acquired, released or pinged per call: sqlx pings a connection every
//! time it returns to its pool, a second round trip per query). A worker
//! waits for the queue, takes everything queued at that moment (at most
//! [`MAX_BATCH`]: natural batching, never a delay to fill a batch), runs one
//! statement for the tokens and one for the sessions among them, and
//! answers each waiter. Identical digests in one batch are looked up once.
//!
//! What keeps this as safe as one query per call:
//!
//! - **A waiter is only answered by a read that starts after it was
//!   queued.** A worker takes waiters off the queue first and only then
//!   sends its statement, so the statement's snapshot is taken after every
//!   waiter it answers was queued, and a waiter never joins a read already
//!   in flight. The hot path captures the cache's epoch before it queues
//!   (`domain::cache`): a revocation acknowledged before that moment is in
//!   the read; one that lands later moves the epoch, and the read is not
//!   cached. Joining an earlier read would break exactly that.
//! - **Errors are today's.** A failed statement fails every waiter of its
//!   batch with the error the one query would have had (the backend's
//!   classification: a lost database is unavailable); the connection is
//!   dropped and the next batch opens a fresh one. A connection opened
//!   before the database last dropped its connections (what PostgreSQL's
//!   pool checks before each acquire) is replaced before it is used. A row
//!   that cannot be read fails only the waiters of its digest.
//! - **A waiter that gives up breaks nothing:** its answer is dropped, and
//!   a waiter gone before its batch starts is not looked up at all.
//! - **Nothing else changes.** Only these two reads come here; a use of a
//!   limited-use token (`consume_use`) and every write still run on the
//!   pool.
//!
//! If no worker can take a lookup (`connections` is 0, the store runs
//! behind a transaction-mode pooler with its statement cache off, or the
//! workers' runtime has ended) it runs on the pool, as before.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
    time::Instant,
};

use sqlx::{ConnectOptions as _, Pool};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Digest, Session, StorageError, Token, WithAccount};
use crate::storage::{
    backend::{Backend, Exec as _},
    rows::{self, SqlRow},
};

/// The most lookups one statement answers.
pub(super) const MAX_BATCH: usize = 128;

/// The digest column the batched statements add, to match rows to waiters.
const DIGEST_COLUMN: &str = "lookup_digest";

/// The tokens whose digests are in the bound list (`$1` as
/// [`Backend::bind_digests`] binds it, matched by `$match`), with their
/// accounts.
macro_rules! tokens_by_digests {
    ($match:literal) => {
        concat!(
            "SELECT t.digest AS lookup_digest, ",
            token_cols!(),
            ", ",
            account_cols!(),
            " FROM tokens t JOIN accounts a ON a.account_id = t.account_id WHERE ",
            $match
        )
    };
}

/// The sessions whose digests are in the bound list, as
/// [`tokens_by_digests`].
macro_rules! sessions_by_digests {
    ($match:literal) => {
        concat!(
            "SELECT s.digest AS lookup_digest, ",
            session_cols!(),
            ", ",
            account_cols!(),
            " FROM sessions s JOIN accounts a ON a.account_id = s.account_id WHERE ",
            $match
        )
    };
}

/// PostgreSQL binds the digests as a `BYTEA[]`.
pub(in crate::storage) const PG_TOKENS_BY_DIGESTS: &str = tokens_by_digests!("t.digest = ANY($1)");
pub(in crate::storage) const PG_SESSIONS_BY_DIGESTS: &str =
    sessions_by_digests!("s.digest = ANY($1)");
/// SQLite binds no arrays: a JSON array of hex strings, each probed in the
/// unique index on `digest`.
pub(in crate::storage) const SQLITE_TOKENS_BY_DIGESTS: &str =
    tokens_by_digests!("t.digest IN (SELECT unhex(value) FROM json_each($1))");
pub(in crate::storage) const SQLITE_SESSIONS_BY_DIGESTS: &str =
    sessions_by_digests!("s.digest IN (SELECT unhex(value) FROM json_each($1))");

/// What a lookup finds. Not boxed: each answer is moved once, through its
/// waiter's channel, and the two kinds are about the same order of size.
#[allow(clippy::large_enum_variant)]
pub(super) enum Found {
    Token(Option<WithAccount<Token>>),
    Session(Option<WithAccount<Session>>),
}

/// Which table a lookup reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Token,
    Session,
}

/// One queued lookup.
struct Request {
    kind: Kind,
    digest: Digest,
    reply: oneshot::Sender<Result<Found, StorageError>>,
}

/// The batcher of one store: the queue, and the workers started on first
/// use.
pub(super) struct Lookups<B: Backend> {
    /// How many workers (each with its connection); 0: none.
    connections: usize,
    /// The queue's sending end, once the workers are started.
    queue: OnceLock<mpsc::UnboundedSender<Request>>,
    /// Where the workers' connections come from.
    pool: Pool<B::Db>,
    backend: B,
}

impl<B: Backend> std::fmt::Debug for Lookups<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lookups")
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Lookups<B> {
    /// A batcher with `connections` workers on connections like `pool`'s.
    pub(super) fn new(pool: Pool<B::Db>, backend: B, connections: u32) -> Self {
        // Behind a transaction-mode pooler (PostgreSQL's statement cache
        // off) each statement needs a transaction of its own, which the
        // pool's path gives it: held connections would gain nothing there
        // (the pooler hands out server connections per transaction).
        let connections = if B::alone_in_transaction() {
            0
        } else {
            connections
        };
        Self {
            connections: usize::try_from(connections).unwrap_or(usize::MAX),
            queue: OnceLock::new(),
            pool,
            backend,
        }
    }

    /// Queues a lookup of `digest` in `kind`'s table and waits for its
    /// batch; `None` if there are no workers to take it (the caller then
    /// runs it on the pool).
    pub(super) async fn lookup(
        &self,
        kind: Kind,
        digest: Digest,
    ) -> Option<Result<Found, StorageError>> {
        if self.connections == 0 {
            return None;
        }
        let queue = self.queue.get_or_init(|| self.start());
        let (reply, answer) = oneshot::channel();
        // Fails only once every worker has ended (their runtime did).
        queue
            .send(Request {
                kind,
                digest,
                reply,
            })
            .ok()?;
        Some(answer.await.unwrap_or_else(|_| {
            // A worker ended with the lookup taken: its runtime is
            // shutting down.
            Err(StorageError::Unavailable(
                "the lookup worker stopped".into(),
            ))
        }))
    }

    /// Starts the workers, which end when the queue's sender (this
    /// batcher) is dropped.
    fn start(&self) -> mpsc::UnboundedSender<Request> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..self.connections {
            let worker = Worker::<B> {
                queue: Arc::clone(&receiver),
                pool: self.pool.clone(),
                backend: self.backend.clone(),
                conn: None,
            };
            tokio::spawn(worker.run());
        }
        sender
    }
}

/// `statement`'s outcome, or a timeout (classified as the pool's own, so a
/// caller sees it as unavailable) once `limit` has passed.
async fn within<B: Backend>(
    limit: std::time::Duration,
    statement: impl std::future::Future<Output = Result<Vec<B::Row>, StorageError>>,
) -> Result<Vec<B::Row>, StorageError> {
    tokio::time::timeout(limit, statement)
        .await
        .unwrap_or_else(|_| Err(B::classify(sqlx::Error::PoolTimedOut)))
}

/// One worker and its connection.
struct Worker<B: Backend> {
    queue: Arc<Mutex<mpsc::UnboundedReceiver<Request>>>,
    pool: Pool<B::Db>,
    backend: B,
    /// Its connection and when it was opened; `None` until the first batch
    /// and after a failure.
    conn: Option<(B::Connection, Instant)>,
}

impl<B: Backend> Worker<B> {
    async fn run(mut self) {
        let queue = Arc::clone(&self.queue);
        while let Some(batch) = Self::next_batch(&queue).await {
            self.answer(batch).await;
        }
    }

    /// Everything queued now (at most [`MAX_BATCH`]), once there is
    /// anything; `None` when the queue is closed. The waiters are taken off
    /// the queue here, before their statement is sent.
    async fn next_batch(queue: &Mutex<mpsc::UnboundedReceiver<Request>>) -> Option<Vec<Request>> {
        let mut queue = queue.lock().await;
        let first = queue.recv().await?;
        let mut batch = Vec::with_capacity(queue.len().min(MAX_BATCH - 1) + 1);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        Some(batch)
    }

    /// Looks up `batch` and answers each waiter.
    async fn answer(&mut self, mut batch: Vec<Request>) {
        batch.retain(|request| !request.reply.is_closed());
        if batch.is_empty() {
            return;
        }
        let (tokens, sessions) = group(batch);
        // A statement gets as long as a pooled query waits for a
        // connection: a connection that stalls (a half-open TCP connection,
        // a frozen server) is dropped then, instead of holding every later
        // miss behind it until the kernel gives up.
        let limit = self.pool.options().get_acquire_timeout();
        let conn = match self.connection().await {
            Ok(conn) => conn,
            Err(err) => {
                fail(tokens.into_values().chain(sessions.into_values()), &err);
                return;
            }
        };
        // Tokens first, answered as soon as their statement is done; then
        // sessions, on the same connection.
        let sessions = match within::<B>(limit, run::<B>(conn, B::TOKENS_BY_DIGESTS, &tokens)).await
        {
            Ok(found) => {
                reply(
                    tokens,
                    found,
                    || Found::Token(None),
                    |row| {
                        let token = rows::token(row)?;
                        Ok(Found::Token(Some((token, rows::account(row)?))))
                    },
                );
                sessions
            }
            Err(err) => {
                self.broken(tokens.into_values().chain(sessions.into_values()), &err);
                return;
            }
        };
        match within::<B>(limit, run::<B>(conn, B::SESSIONS_BY_DIGESTS, &sessions)).await {
            Ok(found) => reply(
                sessions,
                found,
                || Found::Session(None),
                |row| {
                    let session = rows::session(row)?;
                    Ok(Found::Session(Some((session, rows::account(row)?))))
                },
            ),
            Err(err) => self.broken(sessions.into_values(), &err),
        }
    }

    /// A statement failed: the connection may be what failed, so the next
    /// batch opens a fresh one; `waiters` get the statement's error.
    fn broken(
        &mut self,
        waiters: impl Iterator<Item = Vec<oneshot::Sender<Result<Found, StorageError>>>>,
        err: &StorageError,
    ) {
        self.conn = None;
        fail(waiters, err);
    }

    /// The worker's connection: the one it holds, unless it predates the
    /// database's last loss of connections, or a new one (within the pool's
    /// acquire timeout, as a pooled query waits).
    async fn connection(&mut self) -> Result<&mut B::Connection, StorageError> {
        if let Some((_, opened)) = &self.conn
            && self.backend.predates_loss(opened.elapsed())
        {
            self.conn = None;
        }
        if self.conn.is_none() {
            let options = self.pool.connect_options();
            let timeout = self.pool.options().get_acquire_timeout();
            let opened = Instant::now();
            let conn = match tokio::time::timeout(timeout, options.connect()).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(err)) => return Err(B::classify(err)),
                Err(_) => return Err(B::classify(sqlx::Error::PoolTimedOut)),
            };
            self.conn = Some((conn, opened));
        }
        match &mut self.conn {
            Some((conn, _)) => Ok(conn),
            None => Err(StorageError::Other("no lookup connection".into())),
        }
    }
}

/// The waiters of one batch by digest, tokens and sessions apart: each
/// digest is looked up once however many wait for it.
type Waiters = HashMap<Digest, Vec<oneshot::Sender<Result<Found, StorageError>>>>;

fn group(batch: Vec<Request>) -> (Waiters, Waiters) {
    let mut tokens = Waiters::new();
    let mut sessions = Waiters::new();
    for request in batch {
        let waiters = match request.kind {
            Kind::Token => &mut tokens,
            Kind::Session => &mut sessions,
        };
        waiters
            .entry(request.digest)
            .or_default()
            .push(request.reply);
    }
    (tokens, sessions)
}

/// Runs `statement` for the digests of `waiters` (none: no statement).
async fn run<B: Backend>(
    conn: &mut B::Connection,
    statement: &'static str,
    waiters: &Waiters,
) -> Result<Vec<B::Row>, StorageError> {
    if waiters.is_empty() {
        return Ok(Vec::new());
    }
    let digests: Vec<Digest> = waiters.keys().copied().collect();
    B::bind_digests(sqlx::query(statement), &digests)
        .fetch_all(conn.exec())
        .await
        .map_err(B::classify)
}

/// Answers each of `waiters` with the row of its digest, read by `read`
/// (once per digest), or with `none` where there is no row.
fn reply<R: SqlRow>(
    mut waiters: Waiters,
    found: Vec<R>,
    none: fn() -> Found,
    read: impl Fn(&R) -> Result<Found, StorageError>,
) {
    for row in &found {
        let digest = row
            .bytes(DIGEST_COLUMN)
            .ok()
            .and_then(|bytes| Digest::from_stored(&bytes));
        if let Some(senders) = digest.and_then(|d| waiters.remove(&d)) {
            answer_all(senders, read(row));
        }
    }
    for senders in waiters.into_values() {
        for sender in senders {
            let _ = sender.send(Ok(none()));
        }
    }
}

/// Sends `answer` to each of `senders`; a waiter that left is skipped.
fn answer_all(
    senders: Vec<oneshot::Sender<Result<Found, StorageError>>>,
    answer: Result<Found, StorageError>,
) {
    let count = senders.len();
    let mut answer = Some(answer);
    for (i, sender) in senders.into_iter().enumerate() {
        let this = if i + 1 == count {
            answer.take()
        } else {
            answer.as_ref().map(duplicate)
        };
        if let Some(this) = this {
            let _ = sender.send(this);
        }
    }
}

/// Fails every waiter with `err`.
fn fail(
    waiters: impl Iterator<Item = Vec<oneshot::Sender<Result<Found, StorageError>>>>,
    err: &StorageError,
) {
    for senders in waiters {
        for sender in senders {
            let _ = sender.send(Err(copy_error(err)));
        }
    }
}

/// A copy of an answer for another waiter of the same digest.
fn duplicate(answer: &Result<Found, StorageError>) -> Result<Found, StorageError> {
    match answer {
        Ok(Found::Token(found)) => Ok(Found::Token(found.clone())),
        Ok(Found::Session(found)) => Ok(Found::Session(found.clone())),
        Err(err) => Err(copy_error(err)),
    }
}

/// The same error for another waiter: the same variant (so the same gRPC
/// code), and for a boxed cause its message and chain.
fn copy_error(err: &StorageError) -> StorageError {
    match err {
        StorageError::Unavailable(cause) => {
            StorageError::Unavailable(Box::new(Shared::of(&**cause)))
        }
        StorageError::Other(cause) => StorageError::Other(Box::new(Shared::of(&**cause))),
        StorageError::Corrupt(why) => StorageError::Corrupt(why.clone()),
        StorageError::Schema(why) => StorageError::Schema(why.clone()),
        StorageError::Conflict(what) => StorageError::Conflict(*what),
        StorageError::ParentRevoked => StorageError::ParentRevoked,
        StorageError::CreatorEnded => StorageError::CreatorEnded,
        StorageError::AccountGone => StorageError::AccountGone,
        StorageError::TooManyTokens(most) => StorageError::TooManyTokens(*most),
    }
}

/// A cause's message and chain, copied as text for each waiter.
#[derive(Debug)]
struct Shared {
    message: String,
    source: Option<Box<Shared>>,
}

impl Shared {
    fn of(cause: &(dyn std::error::Error + 'static)) -> Self {
        Self {
            message: cause.to_string(),
            source: cause.source().map(|source| Box::new(Self::of(source))),
        }
    }
}

impl std::fmt::Display for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Shared {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}
