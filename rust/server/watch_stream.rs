//! WatchEntities and WatchEntityBatches: each stream is fed from its own watcher queue
//! in the core (bounded, coalescing per entity when full, `min_interval` hold-back) and
//! written by the server without entering Python.
//!
//! A stream sends what its queue holds as fast as the client reads (HTTP/2 flow control
//! is the backpressure; meanwhile the queue coalesces), heartbeats when idle for the
//! asked interval (carrying the resume cursor), and ends with UNAVAILABLE and
//! `resume with since_seq=N` when the server shuts down or the watcher is closed. The
//! batched form sends every event ready at that moment in one `EntityEventBatch`, up to
//! `BATCH_BYTES`.
use super::{Context, Open};
use crate::intern::intern;
use crate::pb::store::v1 as pb;
use crate::watch::{Watch, WatchSpec};
use crate::wire::{put_bytes_field, put_varint_field};
use bytes::Bytes;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tonic::Status;

use super::rpc::BoxStream;

/// Events taken from the queue at a time.
const TAKE: usize = 1024;
/// The largest EntityEventBatch sent (well under gRPC clients' default 4 MiB limit).
const BATCH_BYTES: usize = 1 << 20;
const HEARTBEAT: u64 = 4;

/// Opens a watch for `r` (already checked by the caller except for what the core checks).
pub(crate) fn open(ctx: Arc<Context>, r: pb::WatchEntitiesRequest, batched: bool) -> Result<BoxStream, Status> {
    if ctx.is_closing() {
        return Err(Status::unavailable("server shutting down"));
    }
    if r.components.iter().any(|c| c.is_empty()) {
        return Err(Status::invalid_argument("components must be a list of non-empty component keys"));
    }
    let spec = WatchSpec {
        type_filter: r.type_filter,
        projection: (!r.components.is_empty()).then(|| r.components.iter().map(|k| intern(k)).collect()),
        min_interval: Duration::from_millis(r.min_interval_ms as u64),
        capacity: ctx.watch_queue,
    };
    // The resume cursor this stream has reached: a snapshot is complete only once
    // delivered, so with include_existing it starts from 0.
    let (watch, cursor) = {
        let mut t = ctx.store.table.lock();
        let cursor = r.since_seq.unwrap_or(if r.include_existing { 0 } else { t.seq() });
        (t.watch(spec, r.include_existing, r.since_seq)?, cursor)
    };
    let stream = WatchStream {
        open: Open::new(&ctx, |c| &c.watch_streams),
        closing: ctx.closing.subscribe(),
        ctx,
        watch,
        batched,
        heartbeat: (r.heartbeat_interval_ms > 0).then(|| Duration::from_millis(r.heartbeat_interval_ms as u64)),
        last_write: Instant::now(),
        cursor,
        out: VecDeque::new(),
        done: false,
    };
    // Fed on the fan-out runtime (see `FANOUT_THREADS`), handed over one or
    // two messages ahead; the call's own task only writes them out. The feeder stops when
    // the stream ends or the call is gone (the receiver dropped).
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let fanout = stream.ctx.fanout.clone();
    fanout.spawn(async move {
        let mut stream = stream;
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                _ = tx.closed() => break,
            };
            let Some(message) = next else { break };
            if tx.send(message).await.is_err() {
                break;
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

struct WatchStream {
    ctx: Arc<Context>,
    watch: Arc<Watch>,
    closing: tokio::sync::watch::Receiver<bool>,
    batched: bool,
    heartbeat: Option<Duration>,
    last_write: Instant,
    cursor: u64,
    /// Messages encoded and not yet sent.
    out: VecDeque<Bytes>,
    done: bool,
    #[allow(dead_code)] // held: counts the stream as open until it is dropped
    open: Open,
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.ctx.store.table.lock().unwatch(self.watch.id);
    }
}

impl WatchStream {
    async fn next(&mut self) -> Option<Result<Bytes, Status>> {
        loop {
            if let Some(message) = self.out.pop_front() {
                return Some(Ok(message));
            }
            if self.done {
                return None;
            }
            if *self.closing.borrow() {
                return self.end("server shutting down");
            }
            if self.watch.is_behind() {
                // Only this stream's watcher can be woken by its catch-up: nothing to deliver.
                let _ = self.ctx.store.run(|t| t.catch_up(&self.watch));
            }
            let events = self.watch.poll(TAKE, Duration::ZERO);
            if let Some(last) = events.last() {
                self.cursor = last.cursor;
                self.last_write = Instant::now();
                let encoded = events.iter().map(|e| e.to_wire(e.entity_bytes()));
                self.queue(encoded);
                continue;
            }
            if self.watch.is_closed() {
                return self.end("watch closed by the server");
            }
            let heartbeat_due = self.heartbeat.map(|h| self.last_write + h);
            tokio::select! {
                _ = Ready { watch: &self.watch, sleep: None } => {}
                _ = self.closing.changed() => {}
                _ = sleep_until(heartbeat_due) => {
                    // Idle for a heartbeat interval. The store's seq is a safe cursor only
                    // if nothing is queued or held back for this watcher.
                    let seq = self.ctx.store.seq();
                    let pending = self.watch.stats();
                    if pending.queued > 0 || pending.coalescing {
                        continue;
                    }
                    if pending.held == 0 {
                        self.cursor = self.cursor.max(seq);
                    }
                    let mut beat = Vec::with_capacity(16);
                    put_varint_field(&mut beat, 1, HEARTBEAT);
                    put_varint_field(&mut beat, 4, self.cursor);
                    self.last_write = Instant::now();
                    self.queue(std::iter::once(beat));
                }
            }
        }
    }

    /// Queues encoded EntityEvents: one message each, or batches of them.
    fn queue(&mut self, events: impl Iterator<Item = Vec<u8>>) {
        if !self.batched {
            self.out.extend(events.map(Bytes::from));
            return;
        }
        let mut batch = Vec::new();
        for event in events {
            if !batch.is_empty() && batch.len() + event.len() + 6 > BATCH_BYTES {
                self.out.push_back(std::mem::take(&mut batch).into());
            }
            put_bytes_field(&mut batch, 1, &event);
        }
        if !batch.is_empty() {
            self.out.push_back(batch.into());
        }
    }

    fn end(&mut self, why: &str) -> Option<Result<Bytes, Status>> {
        self.done = true;
        Some(Err(Status::unavailable(format!("{why}; resume with since_seq={}", self.cursor))))
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves once the watch has events (or is closed), or its next held event falls due.
struct Ready<'a> {
    watch: &'a Watch,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for Ready<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let (ready, due) = self.watch.poll_ready(cx.waker());
        if ready {
            return Poll::Ready(());
        }
        match due {
            Some(due) => {
                let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(due)));
                sleep.as_mut().reset(tokio::time::Instant::now() + due);
                sleep.as_mut().poll(cx)
            }
            None => Poll::Pending,
        }
    }
}
