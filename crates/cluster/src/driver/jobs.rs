//! The relinquish and acquire jobs the core hands out: polled once inline
//! (a job that completes without waiting costs no task), spawned otherwise;
//! a type's factory makes a datum's object when its first job comes.

use super::*;

impl Driver {
    /// Reads the datums of the next [`WARM_AHEAD`] jobs in one tight loop:
    /// their map entries lie at random places of a large heap, and loads
    /// that do not wait on each other miss the cache together.
    fn warm_datums(&self, first: Datum) {
        let mut sum = 0usize;
        let next = self.core.handoff().next_jobs(WARM_AHEAD - 1);
        for d in std::iter::once(first).chain(next) {
            if let Some(datum) = self.datums.get(&d) {
                sum = sum.wrapping_add(Arc::strong_count(datum));
            }
        }
        std::hint::black_box(sum);
    }

    /// Runs the jobs the core hands out: polled once here (a job that
    /// completes without waiting costs no task), spawned otherwise.
    pub(super) fn run_jobs(&mut self, now: Instant) {
        self.more_jobs = false;
        let instance = self.core.instance();
        let mut budget = INLINE_JOBS_PER_PUMP;
        let mut warm = 0;
        while budget > 0
            && let Some(job) = self.core.poll_job()
        {
            if warm == 0 {
                self.warm_datums(job.datum);
                warm = WARM_AHEAD;
            }
            warm -= 1;
            let datum = match self.datums.get(&job.datum) {
                Some(d) => Arc::clone(d),
                None => match self.make_on_demand(job.datum) {
                    Ok(Some(d)) => d,
                    Ok(None) => {
                        self.core.job_done(instance, job, Ok(()), now);
                        continue;
                    }
                    Err(error) => {
                        self.core.job_done(instance, job, Err(error), now);
                        continue;
                    }
                },
            };
            Counts::inc(&self.counts.jobs_started);
            trace!(datum = %datum.name(), kind = ?job.kind, attempt = job.attempt, "job");
            let ctx = HandoffContext {
                token: job.token,
                view: job.view,
                attempt: job.attempt,
                reason: job.reason,
                previous: job.previous.clone(),
            };
            let kind = job.kind;
            let mut fut = CatchPanic(match kind {
                JobKind::Relinquish => datum.relinquish_boxed(ctx),
                JobKind::Acquire => datum.acquire_boxed(ctx),
            });
            if self.config.limits.inline_first_poll {
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                if let std::task::Poll::Ready(result) = Pin::new(&mut fut).poll(&mut cx) {
                    let result = self.counts.job_result(&self.name, job.datum, kind, result);
                    self.core.job_done(instance, job, result, now);
                    budget -= 1;
                    // Let other inputs in before the next slice.
                    self.more_jobs = budget == 0;
                    continue;
                }
            }
            let tx = self.done_tx.clone();
            let counts = Arc::clone(&self.counts);
            let name = Arc::clone(&self.name);
            tokio::spawn(async move {
                let result = fut.await;
                let result = counts.job_result(&name, job.datum, kind, result);
                let _ = tx.send(Done::Job(instance, job, result)).await;
            });
        }
    }
}
