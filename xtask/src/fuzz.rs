//! `cargo xtask fuzz --seconds N [--target T]`: runs every cargo-fuzz target
//! of the workspace (`crates/*/fuzz`, each a workspace of its own) for N
//! seconds and prints, per target, the executions and coverage libFuzzer
//! reached and whether it found a crash.
//!
//! No nightly toolchain is needed: cargo-fuzz builds with sanitizer flags
//! that stable rustc accepts when `RUSTC_BOOTSTRAP=1` is set, which this
//! command sets for the build only. cargo-fuzz itself is installed on first
//! use, with `cargo install --locked`, into `<target dir>/tools/bin` (a
//! project-local directory; nothing is written to `~/.cargo/bin`) unless a
//! `cargo-fuzz` is already on the `PATH`. Build output goes to
//! `<target dir>/fuzz`, corpora and crash artifacts to each fuzz directory's
//! `corpus/` and `artifacts/` (ignored by git).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// What `cargo xtask fuzz` takes.
#[derive(clap::Args)]
pub struct FuzzArgs {
    /// How long each target runs, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run only this target (by name, e.g. `decode`).
    #[arg(long)]
    target: Option<String>,
    /// Largest input libFuzzer generates, bytes (`-max_len`): 4 MiB, the
    /// size of the largest state a node accepts from a peer.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    max_len: usize,
    /// Memory limit per target process, MiB (`-rss_limit_mb`): a decoder
    /// that lets a small input allocate far more (a decompression bomb, a
    /// length it believed) crosses it and is reported as a crash.
    #[arg(long, default_value_t = 1024)]
    rss_limit_mb: u64,
    /// Longest one input may run, seconds (`-timeout`): an input whose
    /// decoding amplifies into seconds of CPU is reported as a crash.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

/// One fuzz target: its name and the fuzz directory that holds it.
struct Target {
    dir: PathBuf,
    name: String,
}

/// What libFuzzer said at the end of a run.
#[derive(Default, Debug, PartialEq, Eq)]
struct Report {
    execs: Option<u64>,
    execs_per_sec: Option<u64>,
    cov: Option<u64>,
    features: Option<u64>,
    corpus: Option<u64>,
    peak_rss_mb: Option<u64>,
    crash: Option<String>,
}

pub fn run(args: &FuzzArgs) -> ExitCode {
    let root = workspace_root();
    let target_dir = crate::target_dir();
    let Some(cargo_fuzz) = cargo_fuzz(&target_dir) else {
        return ExitCode::FAILURE;
    };
    let mut targets = match discover(&root, &cargo_fuzz) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("xtask: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(only) = &args.target {
        targets.retain(|t| &t.name == only);
        if targets.is_empty() {
            eprintln!("xtask: no fuzz target named {only}");
            return ExitCode::FAILURE;
        }
    }
    let fuzz_target_dir = target_dir.join("fuzz");
    let mut results = Vec::new();
    for t in &targets {
        eprintln!(
            "xtask: fuzzing {} ({}) for {} s",
            t.name,
            t.dir.strip_prefix(&root).unwrap_or(&t.dir).display(),
            args.seconds
        );
        let log = target_dir.join(format!("fuzz-{}.log", t.name));
        let report = match run_target(&cargo_fuzz, t, args, &fuzz_target_dir, &log) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("xtask: {e}");
                return ExitCode::FAILURE;
            }
        };
        results.push((t.name.clone(), report));
    }
    print_table(&results, args.seconds);
    if results.iter().any(|(_, r)| r.crash.is_some()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The cargo-fuzz binary: on the `PATH`, else in `<target>/tools/bin`,
/// installed there if missing.
fn cargo_fuzz(target_dir: &Path) -> Option<PathBuf> {
    let on_path = Command::new("cargo-fuzz")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if on_path {
        return Some(PathBuf::from("cargo-fuzz"));
    }
    let root = target_dir.join("tools");
    let local = root.join("bin").join("cargo-fuzz");
    if local.exists() {
        return Some(local);
    }
    eprintln!(
        "xtask: installing cargo-fuzz into {} (project-local)",
        root.display()
    );
    let mut cmd = crate::cargo();
    cmd.args(["install", "--locked", "cargo-fuzz", "--root"])
        .arg(&root)
        .env("CARGO_TARGET_DIR", target_dir.join("tools-build"));
    match cmd.status() {
        Ok(s) if s.success() && local.exists() => Some(local),
        Ok(s) => {
            eprintln!("xtask: installing cargo-fuzz failed ({s})");
            None
        }
        Err(e) => {
            eprintln!("xtask: could not run cargo install: {e}");
            None
        }
    }
}

/// Every target of every `crates/*/fuzz` directory, as `cargo fuzz list`
/// names them.
fn discover(root: &Path, cargo_fuzz: &Path) -> Result<Vec<Target>, String> {
    let crates = root.join("crates");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&crates)
        .map_err(|e| format!("cannot read {}: {e}", crates.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path().join("fuzz"))
        .filter(|d| d.join("Cargo.toml").is_file())
        .collect();
    dirs.sort();
    let mut targets = Vec::new();
    for dir in dirs {
        let out = Command::new(cargo_fuzz)
            .arg("list")
            .current_dir(&dir)
            .output()
            .map_err(|e| format!("cargo fuzz list in {}: {e}", dir.display()))?;
        if !out.status.success() {
            return Err(format!(
                "cargo fuzz list in {} failed: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        for name in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            targets.push(Target {
                dir: dir.clone(),
                name: name.to_owned(),
            });
        }
    }
    Ok(targets)
}

/// Builds and runs one target; libFuzzer's output goes to `log` (and is
/// parsed from there).
fn run_target(
    cargo_fuzz: &Path,
    t: &Target,
    args: &FuzzArgs,
    fuzz_target_dir: &Path,
    log: &Path,
) -> Result<Report, String> {
    let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = file
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let status = Command::new(cargo_fuzz)
        .arg("run")
        .arg(&t.name)
        .arg("--target-dir")
        .arg(fuzz_target_dir)
        .arg("--")
        .arg(format!("-max_total_time={}", args.seconds))
        .arg(format!("-max_len={}", args.max_len))
        .arg(format!("-rss_limit_mb={}", args.rss_limit_mb))
        .arg(format!("-timeout={}", args.timeout))
        .arg("-print_final_stats=1")
        .current_dir(&t.dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .stdout(file)
        .stderr(err)
        .status()
        .map_err(|e| format!("could not run cargo fuzz: {e}"))?;
    let text = std::fs::read_to_string(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut report = parse(&text);
    if !status.success() && report.crash.is_none() {
        report.crash = Some(format!(
            "cargo fuzz exited with {status} (see {})",
            log.display()
        ));
    }
    Ok(report)
}

/// The number after `key` in `line` (`cov: 123`, `stat::x: 5`).
fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Reads libFuzzer's output: the last status line (`#N ... cov: C ft: F
/// corp: K/...`), the final stats (`-print_final_stats=1`) and any crash.
fn parse(text: &str) -> Report {
    let mut r = Report::default();
    for line in text.lines() {
        if line.starts_with('#') && line.contains(" cov: ") {
            r.cov = number_after(line, " cov:").or(r.cov);
            r.features = number_after(line, " ft:").or(r.features);
            r.corpus = number_after(line, " corp:").or(r.corpus);
        } else if let Some(n) = number_after(line, "stat::number_of_executed_units:") {
            r.execs = Some(n);
        } else if let Some(n) = number_after(line, "stat::average_exec_per_sec:") {
            r.execs_per_sec = Some(n);
        } else if let Some(n) = number_after(line, "stat::peak_rss_mb:") {
            r.peak_rss_mb = Some(n);
        } else if r.execs.is_none()
            && line.starts_with("Done ")
            && let Some(n) = number_after(line, "Done")
        {
            r.execs = Some(n);
        } else if r.crash.is_none()
            && (line.contains("==ERROR:")
                || line.contains("ERROR: libFuzzer:")
                || line.starts_with("SUMMARY: libFuzzer:")
                || line.contains("panicked at"))
        {
            r.crash = Some(line.trim().to_owned());
        } else if line.contains("Test unit written to") {
            let what = r.crash.take().unwrap_or_default();
            r.crash = Some(format!("{what}; {}", line.trim()));
        }
    }
    r
}

fn print_table(results: &[(String, Report)], seconds: u64) {
    let show = |n: Option<u64>| n.map_or_else(|| "?".to_owned(), |n| n.to_string());
    println!(
        "{:<16} {:>12} {:>9} {:>7} {:>8} {:>7} {:>8}  result ({seconds} s each)",
        "target", "executions", "exec/s", "cov", "features", "corpus", "rss MiB"
    );
    for (name, r) in results {
        println!(
            "{:<16} {:>12} {:>9} {:>7} {:>8} {:>7} {:>8}  {}",
            name,
            show(r.execs),
            show(r.execs_per_sec),
            show(r.cov),
            show(r.features),
            show(r.corpus),
            show(r.peak_rss_mb),
            r.crash.as_deref().unwrap_or("no crash"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_output_is_parsed() {
        let out = "INFO: Seed: 1\n\
            #2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
            #4096\tpulse  cov: 812 ft: 2301 corp: 120/9Kb lim: 4096 exec/s: 2048 rss: 64Mb\n\
            Done 123456 runs in 61 second(s)\n\
            stat::number_of_executed_units: 123456\n\
            stat::average_exec_per_sec:     2023\n\
            stat::new_units_added:          118\n\
            stat::peak_rss_mb:              70\n";
        let r = parse(out);
        assert_eq!(
            r,
            Report {
                execs: Some(123_456),
                execs_per_sec: Some(2023),
                cov: Some(812),
                features: Some(2301),
                corpus: Some(120),
                peak_rss_mb: Some(70),
                crash: None,
            }
        );
        let crash = "==1== ERROR: libFuzzer: out-of-memory (used: 1100Mb; exceeds: 1024Mb)\n\
            artifact_prefix='artifacts/decode/'; Test unit written to artifacts/decode/oom-1\n";
        let r = parse(crash);
        let msg = r.crash.unwrap();
        assert!(
            msg.contains("out-of-memory") && msg.contains("oom-1"),
            "{msg}"
        );
    }
}
