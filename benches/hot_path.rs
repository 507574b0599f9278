//! Hot-path micro-benchmarks: the version pick and the outcome record, alone and together,
//! on one thread and on several threads at once (the per-operation time should stay flat as
//! threads are added: every thread writes its own shard).
//!
//! Run: `cargo bench --bench hot_path`
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use veer::rollout::RolloutState;
use veer::stats::{Class, Outcome, Source, VersionStats};

fn outcome(i: u64) -> Outcome {
    Outcome {
        class: if i.is_multiple_of(50) { Class::ServerError } else { Class::Success },
        fault: i.is_multiple_of(50),
        latency: Duration::from_micros(200 + (i * 7919) % 50_000),
        source: Source::Upstream,
    }
}

/// Runs `op` `iters` times on each of `threads` threads started together; returns the
/// slowest thread's time, so the figure is per operation per thread.
fn concurrent(threads: usize, iters: u64, op: Arc<dyn Fn(u64) + Send + Sync>) -> Duration {
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (b, op) = (barrier.clone(), op.clone());
            std::thread::spawn(move || {
                b.wait();
                let start = Instant::now();
                for i in 0..iters {
                    op(i);
                }
                start.elapsed()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("bench thread")).max().unwrap_or_default()
}

fn bench(c: &mut Criterion) {
    let rollout = Arc::new(RolloutState::new("v2"));
    rollout.set_weight_bp(1000);
    let stats = Arc::new(VersionStats::new());

    let mut g = c.benchmark_group("hot_path");
    g.bench_function("pick", |b| b.iter(|| black_box(rollout.pick_candidate())));
    let mut i = 0u64;
    g.bench_function("record", |b| {
        b.iter(|| {
            i += 1;
            stats.record(black_box(outcome(i)))
        })
    });
    for threads in [1, 2] {
        let (r, s) = (rollout.clone(), stats.clone());
        let op: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |i| {
            black_box(r.pick_candidate());
            s.record(outcome(i));
        });
        g.bench_function(format!("pick_and_record/{threads}_threads"), |b| {
            b.iter_custom(|iters| concurrent(threads, iters, op.clone()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
