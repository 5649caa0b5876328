//! The CUDA kernels themselves, run on the CPU: `kernels/emu/run_kernels.cpp` compiles the
//! sources build.rs generates (what NVRTC compiles) as host C++20 through `kernels/emu/cuda_host.h`
//! (one OS thread per CUDA thread, warp collectives through per-warp barriers, a watchdog for
//! deadlocks) and checks chunking, pooling, forward and backward against the f64 reference that
//! this test writes to a folder per case (the format of `examples/export_batch.rs`, whose writer
//! this test reuses). Awkward small batches, every dtype and head dimension.
//!
//! Needs a C++20 compiler (`$CXX`, `c++`, `g++` or `clang++`); without one the test fails. The
//! driver is built once per source version into Cargo's target tmp dir. Environment:
//! `SPARSECTR_EMU_SANITIZE=address` (AddressSanitizer + UBSan: out-of-bounds accesses) or `thread`
//! (ThreadSanitizer: races) builds a sanitized driver (slow to build); `SPARSECTR_EMU_CASES=name,..`
//! runs only the named cases; `SPARSECTR_EMU_JOBS=n` sets the number of drivers run at once;
//! `SPARSECTR_EMU_RANDOM=n` sets the number of random scenarios (default 6, seed
//! `SPARSECTR_EMU_SEED`, default 7) and `SPARSECTR_EMU_RANDOM_MAX_N` their longest sequence
//! (default 16). The device's approximate math is computed off by its whole
//! documented error bound (`kernels/emu/cuda_host.h`); `EMU_EXACT_MATH=ex2,rcp,..|all` turns
//! those models off, to find which approximation an error comes from. Shared memory is poisoned
//! before every block (the driver links with `kernels/emu/emu_shared.ld`); `EMU_SHARED_POISON=0`
//! turns that off. Each run also writes the bank model's report (`EMU_BANKS`, cuda_host.h) to
//! its folder, and the test fails if any call site of the shared-memory tile helpers takes more
//! wavefronts than its conflict-free ideal. The runs of a few scenarios (`REVERSED_TOO`) are
//! made twice, the second time with every launch's blocks last to first
//! (`EMU_BLOCK_ORDER=reverse`), and their outputs must agree bit for bit (the driver's
//! `DIGEST`; not under `address` or `thread`). `SPARSECTR_EMU_SANITIZE=plain` builds a driver
//! whose every load and store is instrumented (GCC's kernel-address calls; about 1.5x slower, so
//! not the default), so that the report also has plain shared accesses (`a[i] = x`) by source
//! line, named through `addr2line`; those above their ideal are listed, not failed (their widths
//! are the host compile's).

#[allow(dead_code)] // this test uses the folder writer, not the example's `main`
#[path = "../examples/export_batch.rs"]
mod export_batch;

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use export_batch::{write_folder, Export};
use half::{bf16, f16};
use sparsectr_attn::workload::{random_tensor, uniform_tensor, user_history, Rng};
use sparsectr_attn::{
    AttnConfig, Chunks, DType, Dims, Element, Gates, Inputs, JaggedBatch, RelTemporal, NUM_BRANCHES,
};

/// Writes past libtest's output capture, so progress shows as it happens.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

// ---- The driver ----------------------------------------------------------------------------

/// The first C++ compiler that answers `--version`.
fn find_cxx() -> Option<String> {
    let mut candidates = Vec::new();
    if let Ok(cxx) = std::env::var("CXX") {
        candidates.push(cxx);
    }
    candidates.extend(["c++", "g++", "clang++"].map(String::from));
    candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Builds (or reuses) the driver for the current kernel sources; returns its path.
fn build_driver(cxx: &str) -> Result<PathBuf, String> {
    let generated = Path::new(env!("OUT_DIR"));
    let emu = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/emu");
    // -fdata-sections and emu_shared.ld gather the kernels' `__shared__` variables into the range
    // that cuda_host.h poisons before every block.
    let mut flags: Vec<String> = [
        "-std=c++20",
        "-pthread",
        "-fno-strict-aliasing",
        "-fdata-sections",
    ]
    .map(String::from)
    .to_vec();
    flags.push(format!("-Wl,-T,{}", emu.join("emu_shared.ld").display()));
    match std::env::var("SPARSECTR_EMU_SANITIZE").as_deref() {
        Ok("address") => flags.extend(
            [
                "-O1",
                "-g",
                "-fsanitize=address,undefined",
                "-fno-sanitize-recover=undefined",
            ]
            .map(String::from),
        ),
        Ok("thread") => flags.extend(["-O1", "-g", "-fsanitize=thread"].map(String::from)),
        // Every access calls the hooks in cuda_host.h (EMU_PLAIN_ACCESSES); no stack or global
        // redzones, so no runtime library is needed. -g for addr2line.
        Ok("plain") => flags.extend(
            [
                "-O2",
                "-g",
                "-DEMU_PLAIN_ACCESSES",
                "-fsanitize=kernel-address",
                "--param=asan-instrumentation-with-call-threshold=0",
                "--param=asan-stack=0",
                "--param=asan-globals=0",
            ]
            .map(String::from),
        ),
        Ok("") | Err(_) => flags.push("-O2".into()),
        Ok(other) => {
            return Err(format!(
                "SPARSECTR_EMU_SANITIZE={other}: expected address, thread or plain"
            ))
        }
    }
    // The binary is named by everything that goes into it.
    let mut hasher = DefaultHasher::new();
    cxx.hash(&mut hasher);
    flags.hash(&mut hasher);
    let mut inputs: Vec<PathBuf> = vec![
        emu.join("cuda_host.h"),
        emu.join("run_kernels.cpp"),
        emu.join("emu_shared.ld"),
    ];
    let mut cu: Vec<PathBuf> = fs::read_dir(generated)
        .map_err(|e| format!("{}: {e}", generated.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    cu.sort();
    inputs.extend(cu);
    for p in &inputs {
        let text = fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
        p.file_name().hash(&mut hasher);
        text.hash(&mut hasher);
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel_emulation");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let exe = dir.join(format!("run_kernels-{:016x}", hasher.finish()));
    if exe.is_file() {
        return Ok(exe);
    }
    let partial = exe.with_extension("partial");
    let started = Instant::now();
    let out = Command::new(cxx)
        .args(&flags)
        .arg("-iquote")
        .arg(generated)
        .arg("-o")
        .arg(&partial)
        .arg(emu.join("run_kernels.cpp"))
        .output()
        .map_err(|e| format!("running {cxx}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cxx} failed to build the kernel emulation:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    fs::rename(&partial, &exe).map_err(|e| e.to_string())?;
    say!(
        "kernel emulation: built {} with {cxx} {} in {:.0} s",
        exe.display(),
        flags.join(" "),
        started.elapsed().as_secs_f64()
    );
    Ok(exe)
}

// ---- Cases ---------------------------------------------------------------------------------

/// One sequence: behavior timestamps and the number of candidates.
struct Seq {
    behaviors: Vec<i64>,
    candidates: usize,
    /// The candidates' request time after the last behavior (may be negative).
    request_delay: i64,
}

/// Behaviors at `start` and then after each gap.
fn times(start: i64, gaps: &[i64]) -> Vec<i64> {
    let mut t = vec![start];
    for g in gaps {
        t.push(t.last().unwrap() + g);
    }
    t
}

fn seq(behaviors: Vec<i64>, candidates: usize) -> Seq {
    Seq {
        behaviors,
        candidates,
        request_delay: 90,
    }
}

/// Packs sequences; candidates come `request_delay` (90 s unless set) after the last behavior (or
/// at an arbitrary time).
fn pack(user: bool, seqs: &[Seq]) -> JaggedBatch {
    let mut offsets = vec![0usize];
    let mut ts = Vec::new();
    for s in seqs {
        if user {
            ts.push(i64::MIN); // ignored by the attention; absurd so that misuse shows
        }
        ts.extend(&s.behaviors);
        let request = s
            .behaviors
            .last()
            .map_or(1_700_000_000, |t| t + s.request_delay);
        ts.extend(std::iter::repeat_n(request, s.candidates));
        offsets.push(ts.len());
    }
    let cands = seqs.iter().map(|s| s.candidates).collect();
    JaggedBatch::new(offsets, cands, user, ts).expect("a valid test batch")
}

/// Random sequences whose gaps tie often (zero, 5 s, a minute, a day) or are anything.
fn random_seqs(rng: &mut Rng, count: usize, max_n: u64) -> Vec<Seq> {
    (0..count)
        .map(|_| {
            let n = rng.range(0, max_n) as usize;
            let gaps: Vec<i64> = (1..n.max(1))
                .map(|_| match rng.range(0, 5) {
                    0 => 0,
                    1 => 5,
                    2 => 60,
                    3 => 86_400,
                    _ => rng.range(0, 604_800) as i64,
                })
                .collect();
            let start = rng.range(0, 4_000_000_000) as i64 - 100_000_000;
            let b = if n == 0 {
                Vec::new()
            } else {
                times(start, &gaps)
            };
            seq(b, rng.range(0, 3) as usize)
        })
        .collect()
}

/// A request time at or before the last behavior, as a delay after it: at the last behavior,
/// inside the history, or before its first behavior.
fn early_delay(rng: &mut Rng, behaviors: &[i64]) -> i64 {
    let span = match behaviors {
        [first, .., last] => last - first,
        _ => 0,
    };
    match rng.range(0, 2) {
        0 => 0,
        1 => -(rng.range(0, span as u64) as i64),
        _ => -span - rng.range(1, 10_000_000) as i64,
    }
}

#[derive(Clone, Copy)]
enum GatesKind {
    None,
    Native,
    F32,
}

struct Scenario {
    name: &'static str,
    batch: JaggedBatch,
    /// `P`; with `supplied`, the chunks are those instead of the personalized ones.
    num_chunks: usize,
    supplied: Option<(Vec<usize>, Vec<usize>)>,
    tail_tokens: usize,
    window: usize,
    heads: usize,
    temporal: RelTemporal,
    gates: GatesKind,
    /// Driver flags: `--chunks host`, `--repeat-backward`, `--chunking-only`.
    flags: Vec<&'static str>,
    /// (dtype, head dim) runs.
    runs: Vec<(DType, usize)>,
    /// Standard deviation of Q: logits spread about this many nats.
    q_scale: f64,
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const DIMS: [usize; 3] = [32, 64, 128];

/// The three dtypes, with head dims rotating with `i` so that the scenarios cover every pair.
fn all_dtypes(i: usize) -> Vec<(DType, usize)> {
    DTYPES
        .iter()
        .enumerate()
        .map(|(j, &d)| (d, DIMS[(i + j) % 3]))
        .collect()
}

fn scenario(
    name: &'static str,
    batch: JaggedBatch,
    num_chunks: usize,
    m: usize,
    w: usize,
) -> Scenario {
    Scenario {
        name,
        batch,
        num_chunks,
        supplied: None,
        tail_tokens: m,
        window: w,
        heads: 2,
        temporal: RelTemporal::default(),
        gates: GatesKind::Native,
        flags: Vec::new(),
        runs: Vec::new(),
        q_scale: 1.0,
    }
}

fn scenarios() -> Vec<Scenario> {
    let t0 = 1_699_657_200; // a Friday, 23:00 UTC (SPEC section 9)
    let mut v = Vec::new();

    let mut s = scenario("empty-batch", pack(true, &[]), 3, 1, 2);
    s.runs = vec![(DType::F32, 32)];
    v.push(s);
    let mut s = scenario(
        "empty-sequences",
        pack(false, &[seq(vec![], 0), seq(vec![], 0)]),
        3,
        1,
        2,
    );
    s.runs = vec![(DType::BF16, 64)];
    v.push(s);

    // n = 0: a sequence of only the user token and candidates, one of only the user token.
    let mut s = scenario(
        "no-behaviors",
        pack(
            true,
            &[
                seq(vec![], 3),
                seq(times(t0, &[10, 0, 3600, 5]), 2),
                seq(vec![], 0),
                seq(vec![t0 + 7], 1),
            ],
        ),
        3,
        2,
        3,
    );
    s.flags = vec!["--repeat-backward"];
    v.push(s);

    // No user token; empty sequences (same start as the next one) in the middle and at the end.
    let mut s = scenario(
        "no-user-token",
        pack(
            false,
            &[
                seq(times(t0, &[5, 86_400, 5]), 2),
                seq(vec![], 0),
                seq(vec![], 2),
                seq(times(t0 - 1000, &[1, 2, 3, 4, 5]), 0),
                seq(vec![], 0),
            ],
        ),
        2,
        1,
        2,
    );
    s.gates = GatesKind::F32;
    v.push(s);

    let mut s = scenario(
        "no-candidates",
        pack(
            true,
            &[
                seq(times(t0, &[60, 60, 7200, 0, 5, 86_400]), 0),
                seq(times(t0 + 5, &[3, 3]), 0),
                seq(vec![t0], 0),
            ],
        ),
        3,
        2,
        4,
    );
    s.gates = GatesKind::None;
    s.flags = vec!["--chunks", "host"];
    v.push(s);

    // Tails longer than their chunks: m = 4, chunks of 1 and 2 behaviors.
    let s = scenario(
        "chunks-shorter-than-m",
        pack(
            true,
            &[
                seq(times(t0, &[86_400, 5, 86_401, 86_402, 7, 86_403, 3]), 2),
                seq(times(t0, &[100_000, 200_000, 300_000, 400_000]), 1),
            ],
        ),
        5,
        4,
        3,
    );
    v.push(s);

    let mut s = scenario(
        "window-wider-than-n",
        pack(
            true,
            &[
                seq(times(t0, &[1, 2, 3600, 3, 4, 86_400, 5, 6]), 3),
                seq(times(t0, &[9, 9, 9]), 2),
            ],
        ),
        3,
        2,
        100,
    );
    s.gates = GatesKind::F32;
    s.flags = vec!["--chunks", "host"];
    v.push(s);

    let mut s = scenario(
        "window-1",
        pack(
            true,
            &[
                seq(times(t0, &[5, 60, 0, 3600, 5, 5, 86_400, 1, 2]), 2),
                seq(times(t0 + 11, &[0, 0, 70, 0, 1]), 2),
            ],
        ),
        4,
        1,
        1,
    );
    s.gates = GatesKind::None;
    v.push(s);

    // P beyond the number of (positive) gaps.
    let mut s = scenario(
        "p-above-gaps",
        pack(
            true,
            &[
                seq(times(t0, &[0, 0, 5, 0, 60, 0, 0, 5, 0, 0, 3600]), 2),
                seq(vec![t0 + 3], 1),
                seq(times(t0 + 8, &[0]), 1),
            ],
        ),
        50,
        2,
        3,
    );
    s.flags = vec!["--chunks", "host"];
    v.push(s);

    // Equal gaps: the earlier gap wins; runs of simultaneous behaviors are never split.
    let mut s = scenario(
        "ties",
        pack(
            true,
            &[
                seq(times(t0, &[10; 9]), 2),
                seq(times(t0, &[0, 0, 60, 0, 0, 60, 0, 0, 60, 0]), 1),
                seq(times(t0, &[5, 5, 0, 5, 5]), 2),
            ],
        ),
        4,
        2,
        3,
    );
    s.gates = GatesKind::F32;
    v.push(s);

    // Caller-supplied chunks, cutting between simultaneous behaviors too.
    let batch = pack(
        true,
        &[
            seq(times(t0, &[0, 0, 0, 5, 5, 0, 60, 0]), 2),
            seq(times(t0, &[1, 1, 1]), 1),
            seq(vec![], 2),
        ],
    );
    let mut s = scenario("supplied-chunks", batch, 4, 2, 3);
    s.supplied = Some((vec![0, 4, 5, 5], vec![1, 3, 2, 3, 4]));
    s.gates = GatesKind::None;
    v.push(s);

    // Negative times, a UTC offset, few buckets (saturated), spans near i32::MAX, 3 heads.
    let mut s = scenario(
        "time-edges",
        pack(
            true,
            &[
                seq(times(-86_400 * 3 - 7, &[43_200, 86_399, 1, 172_800, 0]), 2),
                seq(
                    times(1_000_000, &[1_000_000_000, 1_000_000_000, 100_000_000]),
                    1,
                ),
            ],
        ),
        3,
        1,
        2,
    );
    s.temporal = RelTemporal {
        num_time_buckets: 5,
        utc_offset: -18_000,
    };
    s.heads = 3;
    v.push(s);

    let mut rng = Rng::new(0x5eed_e111);
    let mut s = scenario(
        "random-a",
        pack(true, &random_seqs(&mut rng, 4, 12)),
        3,
        2,
        4,
    );
    s.temporal.utc_offset = 32_400;
    v.push(s);
    let mut s = scenario(
        "random-b",
        pack(false, &random_seqs(&mut rng, 4, 12)),
        5,
        1,
        6,
    );
    s.gates = GatesKind::F32;
    s.flags = vec!["--chunks", "host"];
    v.push(s);

    // More than 32 slots per branch (transition 6 x 8, window 40) and more than 32 queries per
    // key: several rounds of the warp loops.
    let mut s = scenario(
        "long",
        pack(
            true,
            &[
                seq(user_history(&mut rng, 70, 1_780_000_000), 3),
                seq(user_history(&mut rng, 20, 1_780_000_000), 1),
            ],
        ),
        6,
        8,
        40,
    );
    s.heads = 1;
    s.runs = vec![(DType::F32, 64), (DType::BF16, 128)];
    v.push(s);

    // Chunking only, on sequences longer than a block (256 threads): the radix select and the
    // block scan over several rounds, with ties and mostly-zero gaps.
    let mut s = scenario(
        "chunking-long",
        pack(
            true,
            &[
                seq(
                    times(
                        t0,
                        &(0..699)
                            .map(|i| [0, 5, 60, 3600][i % 4])
                            .collect::<Vec<_>>(),
                    ),
                    1,
                ),
                seq(times(t0, &[7; 299]), 0),
                seq(times(t0, &(0..256).collect::<Vec<_>>()), 2),
                seq(
                    times(
                        t0,
                        &(0..599)
                            .map(|i| if i % 97 == 3 { 1000 + i as i64 } else { 0 })
                            .collect::<Vec<_>>(),
                    ),
                    0,
                ),
            ],
        ),
        100,
        1,
        2,
    );
    s.heads = 1;
    s.flags = vec!["--chunking-only"];
    s.runs = vec![(DType::F32, 32)];
    v.push(s);

    // The batch on which the H100 run's f32 dcoeffs missed 1e-5 (1.25e-5): one chunk, four
    // tails, window 1, and runs of simultaneous behaviors, so each softmax's keys share their
    // features and dcoeffs is a sum of terms that cancel.
    let ties = [
        2879215634, 2879215634, 2879215634, 2879215634, 2879226434, 2879226434, 2879226434,
        2879226434, 2879226434, 2879226434, 2879226434, 2879226434, 2879226434, 2879226434,
        2879262769, 2879262769, 2879349169, 2879349169, 2879349169, 2879349169, 2879349169,
        2879349169, 2879349169, 2879349169, 2879349169, 2879349169, 2879349169, 2879349174,
        2879435574, 2879435574, 2879446374, 2879532774, 2879933995, 2880408693, 2880495093,
        2880766365, 2880766425, 2881257550, 2881827470, 2881909059, 2881996144, 2881996204,
        2881996204, 2881996209, 2882299167, 2882299167, 2882299172, 2882299177,
    ];
    let mut s = scenario(
        "tied-features",
        pack(true, &[seq(ties.to_vec(), 1)]),
        1,
        4,
        1,
    );
    s.heads = 1;
    s.gates = GatesKind::None;
    s.runs = vec![(DType::F32, 32), (DType::F32, 64), (DType::F32, 128)];
    v.push(s);

    // Sequences over several 64-token tiles, for the tensor-core key side: keys whose windows
    // cross tiles, more than 64 tail slots per sequence (two and three blocks of the tails
    // kernel), chunks shorter than m, and a window that reaches the candidates from earlier tiles.
    let gaps = |n: usize, k: usize| -> Vec<i64> {
        (0..n)
            .map(|i| [0, 5, 60, 3600, 7, 90_000, 1, 20][(i * k + i / 7) % 8])
            .collect()
    };
    let long = pack(
        true,
        &[
            seq(times(t0, &gaps(180, 3)), 4),
            seq(times(t0 + 1000, &gaps(130, 5)), 0),
            seq(vec![t0 + 3], 2),
            seq(times(t0 - 86_400, &gaps(70, 1)), 3),
        ],
    );
    // Local windows whose edges fall on 16-slot sub-tile boundaries, for the warps that skip the
    // local sub-tiles none of their rows sees (LocalSpan in the forward and the query backward,
    // 16-query sub-tiles in the key side's walk). With w = 16, the second warp of a sequence's
    // second tile holds only candidates, whose windows start at the last slot of the first
    // 16-slot sub-tile (with and without a user token, which shifts every slot by one) and whose
    // own slots fill a sub-tile with nothing else in it. With w = 18 and no user token, each
    // warp's last visible behavior is alone at the start of a sub-tile. Checked: a span without
    // the user token, one slot late at its start, or one slot short at a warp's last behavior or
    // last candidate fails here (the last two through the per-entry LSE bound only), as do the
    // query backward's sub-tile test one slot late and the key side skipping its last needed
    // sub-tile.
    let spans = |user: bool, w: usize| {
        let seqs = [
            seq(times(t0, &gaps(if user { 76 } else { 78 }, 3)), 40),
            seq(times(t0 + 500, &gaps(150, 5)), 7),
        ];
        scenario("", pack(user, &seqs), 6, 2, w)
    };
    // The forward also skips the per-element mask on the sub-tiles that all 16 rows of a warp
    // see whole (LocalSpan::full_tiles). With w = 31 and no user token, a warp's full span is 16
    // slots that no sub-tile fits: one ends one slot past it in the tiles after a sequence's
    // first, and one starts one slot before it in the first tile, so only a full test one slot
    // long takes them. With a user token, sub-tiles start exactly at the full span's start (and
    // those are full). Checked: the full test one slot long at its start fails both, at its end
    // the first. The unmasked sub-tiles themselves run in early-candidates and the long-* ones.
    for (name, user, w) in [
        ("local-spans", true, 16),
        ("local-spans-no-user", false, 16),
        ("local-spans-w18", false, 18),
        ("local-spans-w31", false, 31),
        ("local-spans-w31-user", true, 31),
    ] {
        let mut s = spans(user, w);
        s.name = name;
        s.runs = if w == 16 {
            vec![(DType::BF16, 64), (DType::F16, 32), (DType::BF16, 128)]
        } else {
            vec![(DType::BF16, 64)]
        };
        v.push(s);
    }
    // Candidates requested before their last behavior (SPEC allows it): they see keys later
    // than themselves, which the forward's one-add dt of a warp's rows (RowBias, row_last) must
    // not take; the warps of behaviors beside them, and the sequence requested at its last
    // behavior, still do. The request falls inside the history, before its first behavior, and
    // at its last.
    let early = |mut s: Seq, delay: i64| {
        s.request_delay = delay;
        s
    };
    let mut s = scenario(
        "early-candidates",
        pack(
            true,
            &[
                early(seq(times(t0, &gaps(99, 3)), 5), -200_000),
                early(seq(times(t0, &gaps(20, 5)), 3), -10_000_000),
                early(seq(times(t0 + 9, &gaps(70, 1)), 2), 0),
            ],
        ),
        8,
        3,
        40,
    );
    s.heads = 1;
    s.runs = vec![(DType::BF16, 64), (DType::F16, 32), (DType::F16, 128)];
    v.push(s);
    let mut s = scenario("long-tiles", long.clone(), 40, 3, 70);
    s.heads = 1;
    s.flags = vec!["--repeat-backward"];
    s.runs = vec![(DType::BF16, 32), (DType::F16, 64), (DType::BF16, 128)];
    v.push(s);
    // 24 chunk summaries and 24 tail slots per sequence: blocks of 32 rows or fewer, which two
    // warp sets walk (half of every query tile each, key_tile.cuh), rows 16 to 23 in the second
    // warp of each set.
    let mut s = scenario("long-two-sets", long.clone(), 24, 1, 40);
    s.heads = 1;
    s.runs = vec![(DType::BF16, 64), (DType::F16, 32), (DType::BF16, 128)];
    v.push(s);
    let mut s = scenario("long-tails", long.clone(), 8, 20, 5);
    s.heads = 1;
    s.runs = vec![(DType::F16, 32), (DType::BF16, 64)];
    v.push(s);
    // Logits spread over tens of nats, so that a row's running max often jumps by more than the
    // tiled softmax's rescaling slack (tile_softmax.cuh) after its first tile of keys: with the
    // usual spread of about one nat the reference max rarely moves that far.
    let mut s = scenario("peaked-logits", long, 40, 3, 70);
    s.heads = 1;
    s.q_scale = 8.0;
    s.runs = vec![(DType::BF16, 64), (DType::F16, 32), (DType::F32, 128)];
    v.push(s);

    // Every other scenario runs all three dtypes, head dims rotating.
    for (i, s) in v.iter_mut().enumerate() {
        if s.runs.is_empty() {
            s.runs = all_dtypes(i);
        }
    }

    // Random scenarios, one run each (SPARSECTR_EMU_RANDOM=n, seed SPARSECTR_EMU_SEED), of
    // sequences up to SPARSECTR_EMU_RANDOM_MAX_N behaviors (16: small and quick; a few hundred
    // take minutes each).
    let extra: usize = env_number("SPARSECTR_EMU_RANDOM").unwrap_or(6);
    let max_n: u64 = env_number("SPARSECTR_EMU_RANDOM_MAX_N").unwrap_or(16);
    let mut rng = Rng::new(env_number("SPARSECTR_EMU_SEED").unwrap_or(7));
    for _ in 0..extra {
        v.push(random_scenario(&mut rng, max_n));
    }
    v
}

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// A random scenario of sequences up to `max_n` behaviors with one random (dtype, head dim) run.
/// Window, chunk count and tail length grow with `max_n` past 16 (the default), so that long
/// draws cross tiles in every branch; at 16 the draws are those of the small scenarios.
fn random_scenario(rng: &mut Rng, max_n: u64) -> Scenario {
    let count = rng.range(1, 5) as usize;
    let user = rng.chance(0.5);
    let mut seqs = random_seqs(rng, count, max_n);
    // A third of the sequences have their candidates requested at or before their last behavior
    // (SPEC allows it): then candidates see keys later than themselves, and the kernels' one-add
    // time gap (forward rows, key-side walks) must give way to |dt| for that sequence alone.
    for s in &mut seqs {
        if rng.chance(1.0 / 3.0) {
            s.request_delay = early_delay(rng, &s.behaviors);
        }
    }
    let window = if rng.chance(0.2) {
        rng.range(10, max_n.max(40))
    } else {
        rng.range(1, (max_n / 4).max(6))
    } as usize;
    let mut s = scenario(
        "random",
        pack(user, &seqs),
        rng.range(1, (max_n / 4).max(8)) as usize,
        rng.range(1, (max_n / 10).max(5)) as usize,
        window,
    );
    s.heads = rng.range(1, 3) as usize;
    s.temporal = RelTemporal {
        num_time_buckets: rng.range(1, 70) as u32,
        utc_offset: rng.range(0, 2 * 86_400) as i64 - 86_400,
    };
    s.gates = [GatesKind::None, GatesKind::Native, GatesKind::F32][rng.range(0, 2) as usize];
    if rng.chance(0.5) {
        s.flags = vec!["--chunks", "host"];
    }
    s.runs = vec![(
        DTYPES[rng.range(0, 2) as usize],
        DIMS[rng.range(0, 2) as usize],
    )];
    s
}

/// Inputs of one run, drawn in the run's dtype.
fn write_case<T: Element>(
    dir: &Path,
    s: &Scenario,
    head_dim: usize,
    seed: u64,
) -> Result<(), String> {
    let batch = &s.batch;
    let chunks = match &s.supplied {
        None => Chunks::personalized(batch, s.num_chunks),
        Some((offsets, lengths)) => Chunks::from_lengths(batch, offsets, lengths),
    }
    .map_err(|e| e.to_string())?;
    let dims = Dims {
        heads: s.heads,
        head_dim,
    };
    let mut config = AttnConfig::new(s.tail_tokens, s.window);
    config.temporal = s.temporal;
    let t = batch.num_tokens();
    let n = t * s.heads * head_dim;
    let mut rng = Rng::new(seed);
    let q: Vec<T> = random_tensor(&mut rng, n, s.q_scale);
    let k: Vec<T> = random_tensor(&mut rng, n, 1.0);
    let v: Vec<T> = random_tensor(&mut rng, n, 1.0);
    let coeffs: Vec<f32> = random_tensor(&mut rng, s.heads * 3, 1.0);
    let g_native: Vec<T> = uniform_tensor(&mut rng, t * s.heads * NUM_BRANCHES, -0.5, 1.5);
    let g_f32: Vec<f32> = uniform_tensor(&mut rng, t * s.heads * NUM_BRANCHES, -0.5, 1.5);
    let d_o: Vec<T> = random_tensor(&mut rng, n, 1.0);
    let inputs = Inputs {
        q: &q,
        k: &k,
        v: &v,
        coeffs: &coeffs,
        gates: match s.gates {
            GatesKind::None => None,
            GatesKind::Native => Some(Gates::Native(&g_native)),
            GatesKind::F32 => Some(Gates::F32(&g_f32)),
        },
    };
    let export = Export {
        name: s.name,
        batch,
        chunks: &chunks,
        personalized: s.supplied.is_none(),
        num_chunks: s.num_chunks,
        dims,
        config,
        inputs,
        d_o: Some(&d_o),
        dense: true,
    };
    write_folder(dir, &export, None).map(|_| ())
}

struct Run {
    label: String,
    dtype: DType,
    dir: PathBuf,
    flags: Vec<&'static str>,
    /// Every launch's blocks last to first (`EMU_BLOCK_ORDER=reverse`), the twin of the run of
    /// the same folder in grid order: the two must compute the same bits.
    reversed: bool,
}

/// The scenarios run a second time with every launch's blocks in reverse order: several 64-token
/// tiles a sequence, two warp sets, and every dtype. A GPU runs blocks in no set order, so a block
/// that reads what another block of its launch writes, or two blocks that write one element
/// differently, would give results that depend on it; in grid order alone the emulation could
/// hide that.
const REVERSED_TOO: [&str; 3] = ["local-spans", "long-two-sets", "no-user-token"];

/// The `name=error` pairs of a driver's result line.
fn errors_of(summary: &str) -> Vec<(String, f64)> {
    let errors = summary.split_once(": ").map_or("", |(_, e)| e);
    errors
        .split(" (")
        .next()
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|item| {
            let (name, value) = item.split_once('=')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// "largest error dk 2.3e-4 of 9 checked (tolerance 3e-3)" over the relative L2 errors, then the
/// largest per-entry error of LSE and dgates (`*_entry`) and per-row error of dQ, dK, dV (`*_row`),
/// each with its own bound in the driver, or that there was nothing to check.
fn worst_line(summary: &str, dtype: DType) -> String {
    let (rows, errors): (Vec<_>, Vec<_>) = errors_of(summary)
        .into_iter()
        .partition(|(name, _)| name.ends_with("_row"));
    let (entries, errors): (Vec<_>, Vec<_>) = errors
        .into_iter()
        .partition(|(name, _)| name.ends_with("_entry"));
    let largest = |v: &[(String, f64)]| v.iter().max_by(|a, b| a.1.total_cmp(&b.1)).cloned();
    let mut line = match largest(&errors) {
        Some((name, e)) => format!(
            "largest error {name} {e:.1e} of {} checked (tolerance {:.0e})",
            errors.len(),
            dtype.tolerance()
        ),
        None => "chunking only".to_string(),
    };
    if let Some((_, e)) = largest(&entries) {
        line.push_str(&format!(", entries (LSE, dgates) {e:.1e}"));
    }
    if let Some((name, e)) = largest(&rows) {
        line.push_str(&format!(", rows {name} {e:.1e}"));
    }
    line
}

/// What one driver run printed and whether it passed.
struct Outcome {
    ok: bool,
    summary: String,
    output: String,
    seconds: f64,
}

impl Outcome {
    /// The driver's digest of every output its `compare` checked (`DIGEST <hex>`).
    fn digest(&self) -> Option<&str> {
        self.output
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("DIGEST "))
    }
}

fn run_driver(exe: &Path, run: &Run) -> Outcome {
    let started = Instant::now();
    // The reversed twin's bank report goes beside the other's: the model counts one order.
    let banks = if run.reversed {
        "banks-reversed.tsv"
    } else {
        BANKS_FILE
    };
    let out = Command::new(exe)
        .arg(&run.dir)
        .args(&run.flags)
        .env("EMU_BANKS", run.dir.join(banks))
        .env(
            "EMU_BLOCK_ORDER",
            if run.reversed { "reverse" } else { "forward" },
        )
        .output();
    let seconds = started.elapsed().as_secs_f64();
    match out {
        Err(e) => Outcome {
            ok: false,
            summary: format!("could not run {}: {e}", exe.display()),
            output: String::new(),
            seconds,
        },
        Ok(o) => {
            let output = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let summary = output
                .lines()
                .rev()
                .find(|l| l.starts_with("OK ") || l.starts_with("FAILED "))
                .unwrap_or("(no result line)")
                .to_string();
            Outcome {
                ok: o.status.success(),
                summary,
                output,
                seconds,
            }
        }
    }
}

/// The shared-memory poison covers only the statics of namespaces named `k_*`
/// (kernels/emu/emu_shared.ld): every namespace run_kernels.cpp wraps a kernel source in must be
/// one, or that kernel's `__shared__` arrays would start at zero again, unchecked.
#[test]
fn every_emulated_kernel_namespace_is_poisoned() {
    let emu = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/emu");
    let driver = fs::read_to_string(emu.join("run_kernels.cpp")).expect("read run_kernels.cpp");
    let lines: Vec<&str> = driver.lines().collect();
    let mut wrapped = Vec::new();
    for pair in lines.windows(2) {
        let (Some(name), Some(source)) = (
            pair[0]
                .strip_prefix("namespace ")
                .and_then(|r| r.strip_suffix(" {")),
            pair[1]
                .strip_prefix("#include \"")
                .and_then(|r| r.strip_suffix('"')),
        ) else {
            continue;
        };
        assert!(
            name.starts_with("k_"),
            "run_kernels.cpp wraps {source} in namespace {name}: emu_shared.ld poisons the \
             `__shared__` arrays of namespaces named k_* only"
        );
        wrapped.push(name);
    }
    assert!(
        wrapped.len() >= 16,
        "found {} kernel namespaces in run_kernels.cpp: {wrapped:?}",
        wrapped.len()
    );
    let script = fs::read_to_string(emu.join("emu_shared.ld")).expect("read emu_shared.ld");
    assert!(
        script.contains(".bss._ZZN[0-9]k_*"),
        "emu_shared.ld no longer gathers the k_* namespaces' statics"
    );
}

#[test]
fn cuda_kernels_in_cpu_emulation_match_the_reference() {
    let started = Instant::now();
    let cxx = find_cxx().unwrap_or_else(|| {
        panic!(
            "kernel emulation needs a C++20 compiler: none of $CXX, c++, g++, clang++ runs \
             (install g++, e.g. `apt-get install g++`)"
        )
    });
    let only: Option<Vec<String>> = std::env::var("SPARSECTR_EMU_CASES")
        .ok()
        .filter(|s| !s.is_empty())
        .map(|s| s.split(',').map(String::from).collect());

    // Build the driver while the reference outputs are written.
    let build = std::thread::spawn(move || build_driver(&cxx));

    let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("kernel_emulation")
        .join("cases");
    let _ = fs::remove_dir_all(&root);
    let all = scenarios();
    // A misspelt name would select nothing and pass.
    if let Some(names) = &only {
        let unknown: Vec<&String> = names
            .iter()
            .filter(|n| !all.iter().any(|s| s.name == n.as_str()))
            .collect();
        assert!(
            unknown.is_empty(),
            "SPARSECTR_EMU_CASES names no scenario {unknown:?}; the scenarios are {:?}",
            {
                let mut names: Vec<&str> = all.iter().map(|s| s.name).collect();
                names.dedup();
                names
            }
        );
    }
    // The twins test what a launch computes, which the plain build's runs cover; under ASan or
    // TSan they would check nothing new, as blocks run one at a time (no race between blocks
    // to find) and reach the same addresses in either order. Without them CI's TSan step took
    // 282 s instead of 489 s.
    let sanitized = matches!(
        std::env::var("SPARSECTR_EMU_SANITIZE").as_deref(),
        Ok("address" | "thread")
    );
    let mut runs = Vec::new();
    for (i, s) in all.iter().enumerate() {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == s.name))
        {
            continue;
        }
        for &(dtype, head_dim) in &s.runs {
            let name = if s.name == "random" {
                format!("random-{i}")
            } else {
                s.name.to_string()
            };
            let label = format!("{name} {} D={head_dim}", dtype.name());
            let dir = root.join(format!("{name}-{}-d{head_dim}", dtype.name()));
            let seed = 1000 * i as u64 + head_dim as u64;
            let written = match dtype {
                DType::F32 => write_case::<f32>(&dir, s, head_dim, seed),
                DType::F16 => write_case::<f16>(&dir, s, head_dim, seed),
                DType::BF16 => write_case::<bf16>(&dir, s, head_dim, seed),
                DType::F64 => unreachable!(),
            };
            if let Err(e) = written {
                panic!("{label}: writing the reference folder failed: {e}");
            }
            if REVERSED_TOO.contains(&s.name) && !sanitized {
                runs.push(Run {
                    label: format!("{label} reversed"),
                    dtype,
                    dir: dir.clone(),
                    flags: s.flags.clone(),
                    reversed: true,
                });
            }
            runs.push(Run {
                label,
                dtype,
                dir,
                flags: s.flags.clone(),
                reversed: false,
            });
        }
    }
    let exe = match build.join().expect("build thread") {
        Ok(exe) => exe,
        Err(e) => panic!("{e}"),
    };
    // In both block orders: the reversed runs below count on blocks running last to first.
    for order in ["forward", "reverse"] {
        let self_test = Command::new(&exe)
            .arg("--self-test")
            .env("EMU_BLOCK_ORDER", order)
            .output()
            .expect("run the kernel emulation's self-test");
        assert!(
            self_test.status.success(),
            "the emulation fails its self-test with EMU_BLOCK_ORDER={order} (collectives, cp.async, time buckets, math models, shared-memory poison, block order, bank model):\n{}{}",
            String::from_utf8_lossy(&self_test.stdout),
            String::from_utf8_lossy(&self_test.stderr)
        );
    }
    // And it must stop a kernel whose lane exits before a collective the others reach.
    let early_exit = Command::new(&exe)
        .arg("--self-test-early-exit")
        .output()
        .expect("run the kernel emulation's early-exit self-test");
    let stderr = String::from_utf8_lossy(&early_exit.stderr);
    assert!(
        early_exit.status.code() == Some(3) && stderr.contains("exited"),
        "the emulation let a lane exit before its warp's shuffle (status {:?}):\n{}{stderr}",
        early_exit.status.code(),
        String::from_utf8_lossy(&early_exit.stdout),
    );

    let jobs = env_number::<usize>("SPARSECTR_EMU_JOBS")
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    say!(
        "kernel emulation: {} runs, {jobs} at a time (reference folders under {})",
        runs.len(),
        root.display()
    );
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Outcome)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(runs.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(run) = runs.get(i) else {
                    break;
                };
                let outcome = run_driver(&exe, run);
                let n = done.fetch_add(1, Ordering::SeqCst) + 1;
                let status = if outcome.ok { "ok  " } else { "FAIL" };
                let detail = if outcome.ok {
                    worst_line(&outcome.summary, run.dtype)
                } else {
                    outcome.summary.clone()
                };
                say!(
                    "[{n:>2}/{}] {status} {:<31} {:>5.1} s  {detail}",
                    runs.len(),
                    run.label,
                    outcome.seconds
                );
                results.lock().unwrap().push((i, outcome));
            });
        }
    });

    // The largest error of each tensor per dtype, over all runs.
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(i, _)| *i);
    let mut worst: BTreeMap<(&str, String), f64> = BTreeMap::new();
    for (i, o) in &results {
        for (name, x) in errors_of(&o.summary) {
            let e = worst.entry((runs[*i].dtype.name(), name)).or_insert(0.0);
            // total_cmp, not f64::max: a NaN error is the worst there is, not one to drop.
            if x.total_cmp(e).is_gt() {
                *e = x;
            }
        }
    }
    for dtype in ["f32", "f16", "bf16"] {
        let line: Vec<String> = worst
            .iter()
            .filter(|((d, _), _)| *d == dtype)
            .map(|((_, name), e)| format!("{name}={e:.1e}"))
            .collect();
        if !line.is_empty() {
            say!("kernel emulation: worst {dtype}: {}", line.join(" "));
        }
    }
    say!(
        "kernel emulation: {} runs in {:.0} s",
        results.len(),
        started.elapsed().as_secs_f64()
    );

    let failed: Vec<String> = results
        .iter()
        .filter(|(_, o)| !o.ok)
        .map(|(i, o)| {
            format!(
                "---- {} ({})\n{}",
                runs[*i].label,
                runs[*i].dir.display(),
                o.output.trim_end()
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} emulated kernel runs failed:\n{}",
        failed.len(),
        results.len(),
        failed.join("\n")
    );
    // Each reversed run against its twin in grid order, bit for bit.
    let mut twins = 0;
    for (i, reversed) in &results {
        if !runs[*i].reversed {
            continue;
        }
        let (_, forward) = results
            .iter()
            .find(|(j, _)| !runs[*j].reversed && runs[*j].dir == runs[*i].dir)
            .expect("every reversed run has a twin in grid order");
        let (a, b) = (forward.digest(), reversed.digest());
        assert!(
            a.is_some() && a == b,
            "{}: the outputs depend on the order in which blocks run: digest {a:?} in grid order, \
             {b:?} in reverse",
            runs[*i].label
        );
        twins += 1;
    }
    if twins > 0 {
        say!("kernel emulation: {twins} runs gave the same bits with every launch's blocks in reverse order");
    }
    check_bank_model(&runs);
}

/// Where each run's driver writes the bank model's report (`EMU_BANKS`).
const BANKS_FILE: &str = "banks.tsv";

/// A call site of the bank model's report: (kernel, file:line:column, load or store, bytes per
/// lane). Its counts are (instructions, wavefronts, ideal wavefronts).
type BankSite = (String, String, String, u32);

/// The shared-memory bank model of every run (`kernels/emu/cuda_host.h`, `EMU_BANKS`): per kernel
/// and call site of the tile helpers (cp.async stores, ldmatrix, load_pair, store_pair), the
/// wavefronts its warp instructions took and the conflict-free ideal. Every site must take its
/// ideal: a tile layout or thread mapping with bank conflicts fails here, with the sites and
/// their ratios (the forward's and query backward's K and V gathers took twice their ideal
/// before gather_slot in `kernels/attn/tc_slots.cuh`).
fn check_bank_model(runs: &[Run]) {
    let mut sites: BTreeMap<BankSite, (u64, u64, u64)> = BTreeMap::new();
    const HEADER: &str = "kernel\tsite\top\tbytes\tinstructions\twavefronts\tideal";
    for run in runs.iter().filter(|r| !r.reversed) {
        // Every driver run writes one, with no site where nothing went through the helpers (the
        // empty batches): a missing file is a model that recorded nothing, not a clean one.
        let path = run.dir.join(BANKS_FILE);
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: no bank model report ({e})", path.display()));
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(HEADER), "{}: header", path.display());
        let shared = lines
            .next()
            .and_then(|l| l.strip_prefix("# shared bytes "))
            .and_then(|n| n.parse::<u64>().ok());
        assert!(
            shared.is_some_and(|n| n > 0),
            "{}: the model saw no shared memory ({shared:?} bytes): was the driver linked \
             without kernels/emu/emu_shared.ld?",
            path.display()
        );
        for line in lines {
            let f: Vec<&str> = line.split('\t').collect();
            let parsed = (f.len() == 7)
                .then(|| {
                    let n = |i: usize| f[i].parse::<u64>().ok();
                    Some((f[3].parse::<u32>().ok()?, n(4)?, n(5)?, n(6)?))
                })
                .flatten();
            let Some((bytes, instructions, wavefronts, ideal)) = parsed else {
                panic!("{}: unreadable line {line:?}", path.display());
            };
            let e = sites
                .entry((f[0].to_string(), f[1].to_string(), f[2].to_string(), bytes))
                .or_insert((0, 0, 0));
            e.0 += instructions;
            e.1 += wavefronts;
            e.2 += ideal;
        }
    }
    let kernels: std::collections::BTreeSet<&String> = sites.keys().map(|k| &k.0).collect();
    let (instructions, wavefronts): (u64, u64) =
        sites.values().fold((0, 0), |(i, w), v| (i + v.0, w + v.1));
    say!(
        "kernel emulation: bank model: {} call sites in {} kernels, {instructions} warp \
         instructions, {wavefronts} wavefronts",
        sites.len(),
        kernels.len()
    );
    // Every case but the empty batches runs tensor-core kernels, which use the helpers.
    if runs.iter().any(|r| !r.label.starts_with("empty-")) {
        assert!(
            !sites.is_empty(),
            "the bank model recorded no shared-memory access"
        );
    }
    let describe = |((kernel, site, op, bytes), (i, w, ideal)): (&BankSite, &(u64, u64, u64))| {
        format!(
            "  {kernel} {site} ({bytes}-byte {op}): {w} wavefronts for {i} instructions, \
             ideal {ideal} ({:.2}x)",
            *w as f64 / (*ideal).max(1) as f64
        )
    };
    // Plain accesses (SPARSECTR_EMU_SANITIZE=plain) come with the host compile's widths, which
    // are not always the device's (a 16-byte struct that ptxas stores whole, the host stores field
    // by field), so they are listed for a reader to check against the SASS, not failed.
    let (plain, helpers): (Vec<_>, Vec<_>) = sites
        .iter()
        .filter(|(_, v)| v.1 != v.2)
        .partition(|((_, site, _, _), _)| site.contains(" (plain)"));
    if !plain.is_empty() {
        say!(
            "kernel emulation: bank model: plain accesses above their ideal at {} sites (host \
             widths; compare the SASS before acting on one):\n{}",
            plain.len(),
            plain
                .into_iter()
                .map(describe)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let conflicted: Vec<String> = helpers.into_iter().map(describe).collect();
    assert!(
        conflicted.is_empty(),
        "shared-memory bank conflicts (kernels/emu/cuda_host.h, EMU_BANKS) at {} call sites:\n{}",
        conflicted.len(),
        conflicted.join("\n")
    );
}
