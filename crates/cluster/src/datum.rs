//! The application's datums: the seed's `DistDatum`, with async relinquish
//! and acquire.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use shoal_placement::ViewId;
use shoal_transition::FencingToken;

/// What a relinquish or acquire may fail with (any error, reported in the
/// transition's events and retried with backoff by the handoff layer).
pub type DatumError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A piece of application state owned by one node at a time: the seed's
/// `DistDatum`.
///
/// `(type_name, id)` identifies it; placement looks at `id` only. The node
/// calls [`relinquish`](DistDatum::relinquish) on the old owner when the
/// datum moves away (persist its state; after it returns `Ok` the state must
/// be durable, because the new owner may start at once), and
/// [`acquire`](DistDatum::acquire) on the new owner once the old owner's
/// notice arrived (or the old owner was declared failed, or the transition
/// timeout passed). Each runs as its own tokio task, at most
/// `limits.max_relinquish_jobs` / `limits.max_acquire_jobs` at once; an
/// error is retried with backoff within the transition timeout and reported.
/// With `limits.inline_first_poll` (the default) the node polls the future
/// once itself before spawning it, so the code before the first `.await`
/// must not block the thread.
///
/// **Delivered, then relinquished before the handler ran.** A message sent
/// to a datum's owner is delivered to the owner's channel queue while it
/// holds the datum; the datum can move away (a view change starts its
/// relinquish) before the application takes the message off the queue. The
/// node does not reach into the application's queue. A handler that must
/// act only as the owner asks [`Node::holds`](crate::Node::holds) first
/// and, when it answers `false`, sends the message on with
/// [`Sender::send_to_owner`](crate::Sender::send_to_owner): it reaches the
/// new owner (or waits for one). Writes that must never come from a former
/// owner carry the fencing token to a store that refuses older ones.
///
/// ```
/// use shoal::{DatumError, DistDatum, HandoffContext};
///
/// struct Series { id: i64 }
///
/// impl DistDatum for Series {
///     fn id(&self) -> i64 { self.id }
///     fn type_name(&self) -> &str { "series" }
///     async fn relinquish(&self, _ctx: HandoffContext) -> Result<(), DatumError> {
///         // flush the in-memory points to the database
///         Ok(())
///     }
///     async fn acquire(&self, _ctx: HandoffContext) -> Result<(), DatumError> {
///         // drop the local cache; the next point reloads it
///         Ok(())
///     }
/// }
/// ```
pub trait DistDatum: Send + Sync + 'static {
    /// The datum's integer id (placement's input). Negative ids are fine.
    fn id(&self) -> i64;
    /// The datum's type name (1 to 255 bytes); `(type_name, id)` is unique.
    fn type_name(&self) -> &str;
    /// A name for logs (the seed's `GetName`). Defaults to `type:id`.
    fn name(&self) -> String {
        format!("{}:{}", self.type_name(), self.id())
    }
    /// Persists the datum and stops processing it: it moves to another node.
    /// Flush under `ctx.token`, the fencing token the datum was held under:
    /// a store that refuses writes with an older token than one it accepted
    /// keeps a former owner from overwriting its successor.
    fn relinquish(
        &self,
        ctx: HandoffContext,
    ) -> impl Future<Output = Result<(), DatumError>> + Send;
    /// Prepares to process the datum: it moved here. `ctx.token` is the new
    /// ownership's fencing token, strictly higher than any earlier owner's:
    /// write under it for as long as the datum is held here.
    fn acquire(&self, ctx: HandoffContext) -> impl Future<Output = Result<(), DatumError>> + Send;
}

/// What a relinquish or acquire is told about the ownership it ends or
/// starts.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandoffContext {
    /// The fencing token of the ownership: for an acquire, the new one
    /// (strictly higher than the previous owner's); for a relinquish, the
    /// one the datum was held under.
    pub token: FencingToken,
    /// The view in force when the job started.
    pub view: ViewId,
    /// 1 for the first attempt, then 2, 3... on retries.
    pub attempt: u32,
    /// Why it runs: a relinquish because the datum moves
    /// ([`JobReason::Moving`](crate::JobReason::Moving)); an acquire after
    /// a graceful handoff (the previous holder's notice), a failover (the
    /// holder was declared failed: what it did not persist is lost), as the
    /// first owner, once nobody held it, or after the wait timed out.
    pub reason: shoal_transition::JobReason,
    /// For an acquire after a graceful handoff: the node whose notice
    /// handed the datum over (its previous owner, or a node that passed the
    /// notice on). `None` for a relinquish and for other acquires (after a
    /// failover the failed holder is not named).
    pub previous: Option<shoal_placement::NodeId>,
}

/// The future of one relinquish or acquire, type-erased.
pub(crate) type JobFuture = Pin<Box<dyn Future<Output = Result<(), DatumError>> + Send>>;

/// Makes the datum of a type registered on demand, from its id
/// ([`Node::register_factory`](crate::Node::register_factory)).
pub(crate) type Factory = Arc<dyn Fn(i64) -> Arc<dyn ErasedDatum> + Send + Sync>;

/// Object-safe form of [`DistDatum`], what the driver keeps.
pub(crate) trait ErasedDatum: Send + Sync + 'static {
    fn id(&self) -> i64;
    fn type_name(&self) -> &str;
    fn name(&self) -> String;
    fn relinquish_boxed(self: Arc<Self>, ctx: HandoffContext) -> JobFuture;
    fn acquire_boxed(self: Arc<Self>, ctx: HandoffContext) -> JobFuture;
}

impl<D: DistDatum> ErasedDatum for D {
    fn id(&self) -> i64 {
        DistDatum::id(self)
    }
    fn type_name(&self) -> &str {
        DistDatum::type_name(self)
    }
    fn name(&self) -> String {
        DistDatum::name(self)
    }
    fn relinquish_boxed(self: Arc<Self>, ctx: HandoffContext) -> JobFuture {
        Box::pin(async move { self.relinquish(ctx).await })
    }
    fn acquire_boxed(self: Arc<Self>, ctx: HandoffContext) -> JobFuture {
        Box::pin(async move { self.acquire(ctx).await })
    }
}

/// How an application callback (`relinquish`, `acquire`) failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallbackFailure {
    /// It returned an error.
    #[error("{0}")]
    Error(String),
    /// It panicked; the panic was caught and the driver goes on.
    #[error("panicked: {0}")]
    Panicked(String),
}

/// A job's future that turns a panic of the application's code into a
/// [`CallbackFailure::Panicked`] instead of unwinding into the driver (an
/// inline poll) or ending the job's task without a report (the datum would
/// stay in flight forever).
pub(crate) struct CatchPanic(pub(crate) JobFuture);

impl Future for CatchPanic {
    type Output = Result<(), CallbackFailure>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let fut = &mut self.0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            Ok(Poll::Ready(Err(e))) => Poll::Ready(Err(CallbackFailure::Error(e.to_string()))),
            Err(panic) => Poll::Ready(Err(CallbackFailure::Panicked(panic_message(&*panic)))),
        }
    }
}

/// The message of a caught panic, when it carries one.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
