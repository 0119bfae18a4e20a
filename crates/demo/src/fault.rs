//! Real faults for the real-process scenarios: traffic cut between the
//! nodes' loopback UDP ports with nftables, and processes frozen with
//! SIGSTOP / SIGCONT.
//!
//! Every fault is an owned value that undoes itself when dropped: a
//! [`Cut`] deletes its nftables table, a [`Freeze`] sends SIGCONT. The
//! driver keeps them in a [`Faults`] set, which also removes what a crashed
//! earlier run left behind (tables named `shoal_sim_*`) and is cleared on
//! Ctrl-C by the driver's signal handler. Needs root (as on the project's
//! CI and development machines) and the `nft` command, which
//! [`ensure_nft`] installs from the distribution's `nftables` package when
//! it is missing.

use std::process::Command;
use std::sync::{Arc, Mutex, Once, Weak};

/// Prefix of every nftables table this module makes.
pub const TABLE_PREFIX: &str = "shoal_sim_";

/// What a fault could not do.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// `nft` is not installed and could not be installed.
    #[error("nftables is not available ({0}); install the `nftables` package, as root")]
    NoNft(String),
    /// A command failed.
    #[error("{command}: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Its standard error, or why it did not run.
        detail: String,
    },
}

fn run(program: &str, args: &[&str]) -> Result<String, FaultError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| FaultError::Command {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(FaultError::Command {
            command,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn nft(script: &str) -> Result<(), FaultError> {
    run("nft", &[script]).map(|_| ())
}

/// Makes sure `nft` can run: installs the `nftables` package with apt-get
/// when it is missing (as root).
///
/// # Errors
/// [`FaultError::NoNft`] when it is missing and cannot be installed.
pub fn ensure_nft() -> Result<(), FaultError> {
    if run("nft", &["--version"]).is_ok() {
        return Ok(());
    }
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    let install = |update: bool| -> Result<(), FaultError> {
        if update {
            run("apt-get", &["update", "-q"])?;
        }
        let out = Command::new("apt-get")
            .args(["install", "-y", "-q", "nftables"])
            .envs(env)
            .output()
            .map_err(|e| FaultError::NoNft(e.to_string()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(FaultError::NoNft(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ))
        }
    };
    install(false)
        .or_else(|_| install(true))
        .map_err(|e| FaultError::NoNft(e.to_string()))?;
    run("nft", &["--version"])
        .map(|_| ())
        .map_err(|e| FaultError::NoNft(e.to_string()))
}

/// Deletes every table a run of this module left behind (`shoal_sim_*`):
/// those of processes that are gone, and this process' own. Tables of
/// another live process (a run or test going on beside this one) stay.
pub fn remove_leftovers() {
    remove_tables(|pid| pid == std::process::id() || !process_alive(pid));
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes the `shoal_sim_<pid>_<id>` tables whose `pid` passes `which`
/// (a name that does not parse counts as pid 0).
fn remove_tables(which: impl Fn(u32) -> bool) {
    let Ok(list) = run("nft", &["list", "tables"]) else {
        return;
    };
    for line in list.lines() {
        // "table inet shoal_sim_123_4"
        let mut words = line.split_whitespace();
        if let (Some("table"), Some(family), Some(name)) =
            (words.next(), words.next(), words.next())
            && let Some(rest) = name.strip_prefix(TABLE_PREFIX)
        {
            let pid = rest
                .split('_')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if which(pid) {
                let _ = nft(&format!("delete table {family} {name}"));
            }
        }
    }
}

/// Fault sets to clear when this process gets SIGINT or SIGTERM.
static ON_SIGNAL: Mutex<Vec<Weak<Mutex<Faults>>>> = Mutex::new(Vec::new());
static HANDLER: Once = Once::new();

/// Exit status after a cleanup on SIGINT / SIGTERM (128 + SIGINT).
pub const SIGNAL_EXIT: i32 = 130;

/// Clears `faults` (heals every cut, thaws every frozen process) if this
/// process gets SIGINT or SIGTERM, then exits with [`SIGNAL_EXIT`]; also
/// deletes this process' tables a cut being made may have left. The first
/// call installs the handler (a thread waiting on the signals with tokio's
/// signal support, which the demo already depends on); the set is held
/// weakly, so a dropped set (cleared by its own drop) is skipped.
///
/// # Errors
/// [`FaultError::Command`] when the handler cannot be installed.
pub fn clear_on_signal(faults: &Arc<Mutex<Faults>>) -> Result<(), FaultError> {
    let mut installed = Ok(());
    HANDLER.call_once(|| installed = install_handler());
    installed?;
    let mut list = ON_SIGNAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    list.retain(|w| w.strong_count() > 0);
    list.push(Arc::downgrade(faults));
    Ok(())
}

fn install_handler() -> Result<(), FaultError> {
    use tokio::signal::unix::{SignalKind, signal};
    let err = |e: std::io::Error| FaultError::Command {
        command: "signal handler".into(),
        detail: e.to_string(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(err)?;
    // Registered here, before the thread runs, so a signal right after
    // this call is already caught.
    let (mut int, mut term) = runtime
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })
        .map_err(err)?;
    std::thread::Builder::new()
        .name("fault-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
            clear_all();
            eprintln!("shoal-demo: interrupted: faults removed (network healed, processes thawed)");
            std::process::exit(SIGNAL_EXIT);
        })
        .map_err(err)?;
    Ok(())
}

/// Heals and thaws every registered set, and deletes this process' tables.
fn clear_all() {
    let list = ON_SIGNAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for faults in list.iter().filter_map(Weak::upgrade) {
        let mut f = faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f.heal();
        f.thaw();
    }
    let me = std::process::id();
    remove_tables(|pid| pid == me);
}

/// UDP traffic dropped between two sets of loopback ports, until dropped.
#[derive(Debug)]
pub struct Cut {
    table: String,
}

impl Cut {
    /// Drops UDP datagrams from any port of `from` to any port of `to` and,
    /// unless `one_way`, from `to` to `from` too.
    ///
    /// # Errors
    /// [`FaultError`] when nftables refuses (the table is removed again).
    pub fn new(id: u32, from: &[u16], to: &[u16], one_way: bool) -> Result<Cut, FaultError> {
        let table = format!("{TABLE_PREFIX}{}_{id}", std::process::id());
        let set = |ports: &[u16]| {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            format!("{{ {} }}", list.join(", "))
        };
        let (a, b) = (set(from), set(to));
        let mut script = format!(
            "add table inet {table}\n\
             add chain inet {table} input {{ type filter hook input priority -10 ; }}\n\
             add rule inet {table} input udp sport {a} udp dport {b} drop\n"
        );
        if !one_way {
            script.push_str(&format!(
                "add rule inet {table} input udp sport {b} udp dport {a} drop\n"
            ));
        }
        let cut = Cut { table };
        nft(&script)?;
        Ok(cut)
    }

    /// The nftables table that holds the rules.
    #[must_use]
    pub fn table(&self) -> &str {
        &self.table
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        let _ = nft(&format!("delete table inet {}", self.table));
    }
}

/// A process frozen with SIGSTOP, thawed (SIGCONT) when dropped.
#[derive(Debug)]
pub struct Freeze {
    pid: u32,
}

impl Freeze {
    /// Freezes process `pid`.
    ///
    /// # Errors
    /// [`FaultError`] when the signal cannot be sent.
    pub fn new(pid: u32) -> Result<Freeze, FaultError> {
        run("kill", &["-STOP", &pid.to_string()])?;
        Ok(Freeze { pid })
    }

    /// The frozen process.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        let _ = run("kill", &["-CONT", &self.pid.to_string()]);
    }
}

/// The faults in force, undone when removed or dropped.
#[derive(Debug, Default)]
pub struct Faults {
    cuts: Vec<Cut>,
    freezes: Vec<Freeze>,
}

impl Faults {
    /// Adds a cut.
    pub fn cut(&mut self, cut: Cut) {
        self.cuts.push(cut);
    }

    /// Adds a freeze.
    pub fn freeze(&mut self, freeze: Freeze) {
        self.freezes.push(freeze);
    }

    /// Removes every cut (heals the network).
    pub fn heal(&mut self) {
        self.cuts.clear();
    }

    /// Thaws every frozen process.
    pub fn thaw(&mut self) {
        self.freezes.clear();
    }

    /// Whether any fault is in force.
    #[must_use]
    pub fn any(&self) -> bool {
        !self.cuts.is_empty() || !self.freezes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A real cut on loopback, as root with nftables (installed here when
    /// missing): datagrams stop, one-way cuts stop one direction, and the
    /// table is gone after the drop.
    #[test]
    fn a_cut_drops_datagrams_and_is_removed_on_drop() {
        if ensure_nft().is_err() {
            eprintln!("nftables unavailable (not root?): fault test skipped");
            return;
        }
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        a.set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        let (pa, pb) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let gets = |from: &std::net::UdpSocket, to: &std::net::UdpSocket| {
            from.send_to(b"x", to.local_addr().unwrap()).unwrap();
            let mut buf = [0u8; 8];
            to.recv_from(&mut buf).is_ok()
        };
        assert!(gets(&a, &b));
        let table;
        {
            let cut = Cut::new(1, &[pa.port()], &[pb.port()], true).unwrap();
            table = cut.table().to_owned();
            assert!(!gets(&a, &b), "a to b is cut");
            assert!(gets(&b, &a), "b to a still flows (one-way)");
        }
        assert!(gets(&a, &b), "healed on drop");
        let tables = run("nft", &["list", "tables"]).unwrap();
        assert!(!tables.contains(&table), "{tables}");
        {
            let _cut = Cut::new(2, &[pa.port()], &[pb.port()], false).unwrap();
            assert!(!gets(&a, &b));
            assert!(!gets(&b, &a));
        }
        assert!(gets(&b, &a));
    }
}
