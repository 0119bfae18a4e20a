//! The series store: SQLite (one file the local processes share, WAL mode,
//! busy timeout) or PostgreSQL (for runs across machines), with an
//! append-only `writes` table for the ownership audit.
//!
//! **Fencing.** Every series row keeps the highest fencing token a write was
//! accepted under (`series.token`) and its writer. A write carries its
//! writer's token for each series; the statement that applies it also
//! checks it (`... WHERE series.token < $token OR (series.token = $token AND
//! the same writer)`), so a write under an older token than one already
//! accepted, or under an equal token by another writer, changes nothing and
//! is reported as refused, whatever the writer believes about its
//! ownership. An acquire *claims* the series:
//! it raises the stored token to the new owner's at once, so the previous
//! owner's later flushes are refused even before the new owner writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused an operation.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused an operation.
    #[error("postgres: {0}")]
    Postgres(#[from] postgres::Error),
    /// The store URL is not one this build understands.
    #[error("unsupported store {0:?} (use `sqlite:<path>`, a path, or `postgres://...`)")]
    Unsupported(String),
    /// The store is being dropped.
    #[error("the store is closed")]
    Closed,
    /// A blocking store task failed.
    #[error("store task: {0}")]
    Task(String),
}

/// Where the store lives, parsed from `--store`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgres://user:pass@host/db`, no TLS).
    Postgres(String),
}

impl StoreUrl {
    /// Parses `sqlite:<path>`, a bare path, or `postgres://` /
    /// `postgresql://` URLs.
    ///
    /// # Errors
    /// [`StoreError::Unsupported`] for other schemes.
    pub fn parse(s: &str) -> Result<StoreUrl, StoreError> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(s.to_owned()));
        }
        if let Some(path) = s.strip_prefix("sqlite:") {
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if s.contains("://") {
            return Err(StoreError::Unsupported(s.to_owned()));
        }
        Ok(StoreUrl::Sqlite(PathBuf::from(s)))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            StoreUrl::Postgres(url) => f.write_str(url),
        }
    }
}

/// The aggregate of one series (or a delta of it).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Aggregate {
    /// Points.
    pub count: u64,
    /// Sum of values.
    pub sum: f64,
    /// Smallest value (meaningless when `count` is 0).
    pub min: f64,
    /// Largest value (meaningless when `count` is 0).
    pub max: f64,
    /// Time of the last point, milliseconds since the Unix epoch.
    pub last_ms: i64,
}

impl Aggregate {
    /// Adds one point.
    pub fn add(&mut self, value: f64, t_ms: i64) {
        if self.count == 0 {
            self.min = value;
            self.max = value;
        } else {
            self.min = self.min.min(value);
            self.max = self.max.max(value);
        }
        self.count += 1;
        self.sum += value;
        self.last_ms = self.last_ms.max(t_ms);
    }
}

/// Who writes: a node's name and generation, and the placement view id it
/// had in force.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Writer {
    /// Node name.
    pub node: String,
    /// Node generation (process start, ns since the epoch).
    pub generation: u64,
}

/// Kind of a row of the `writes` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// A periodic (or final) flush of points.
    Flush,
    /// The flush of a relinquish: the writer gives the series up.
    Relinquish,
    /// An acquire: the writer takes the series (count 0).
    Acquire,
}

/// `writes.kind` of a refused part of a write (its points were not added).
const REFUSED: &str = "refused";

impl WriteKind {
    fn as_str(self) -> &'static str {
        match self {
            WriteKind::Flush => "flush",
            WriteKind::Relinquish => "relinquish",
            WriteKind::Acquire => "acquire",
        }
    }
}

enum Backend {
    Sqlite(Connection),
    Postgres(Box<postgres::Client>),
    /// Only while the store is dropped.
    Closed,
}

impl Drop for Store {
    fn drop(&mut self) {
        let conn = self
            .conn
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Backend::Postgres(client) = std::mem::replace(conn, Backend::Closed) {
            // The synchronous client blocks on its own runtime when it
            // closes, which panics inside an async context: close it on a
            // plain thread.
            let _ = std::thread::Builder::new()
                .name("postgres-close".into())
                .spawn(move || drop(client));
        }
    }
}

/// The store: one connection per process, serialised by a mutex (callers
/// run it on a blocking thread).
pub struct Store {
    conn: Mutex<Backend>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

const PG_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS series (
    id BIGINT PRIMARY KEY,
    count BIGINT NOT NULL,
    sum DOUBLE PRECISION NOT NULL,
    min DOUBLE PRECISION NOT NULL,
    max DOUBLE PRECISION NOT NULL,
    last_ms BIGINT NOT NULL,
    node TEXT NOT NULL,
    generation BIGINT NOT NULL,
    token BIGINT NOT NULL DEFAULT 0
);
ALTER TABLE series ADD COLUMN IF NOT EXISTS token BIGINT NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS writes (
    seq BIGSERIAL PRIMARY KEY,
    series BIGINT NOT NULL,
    node TEXT NOT NULL,
    generation BIGINT NOT NULL,
    view_id BIGINT NOT NULL,
    kind TEXT NOT NULL,
    count BIGINT NOT NULL,
    t_ms BIGINT NOT NULL
);
";

const PG_UPSERT: &str = "INSERT INTO series (id, count, sum, min, max, last_ms, node, generation, token)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
    ON CONFLICT (id) DO UPDATE SET
        count = series.count + EXCLUDED.count,
        sum = series.sum + EXCLUDED.sum,
        min = CASE WHEN series.count = 0 THEN EXCLUDED.min ELSE LEAST(series.min, EXCLUDED.min) END,
        max = CASE WHEN series.count = 0 THEN EXCLUDED.max ELSE GREATEST(series.max, EXCLUDED.max) END,
        last_ms = GREATEST(series.last_ms, EXCLUDED.last_ms),
        node = EXCLUDED.node,
        generation = EXCLUDED.generation,
        token = EXCLUDED.token
    WHERE series.token < EXCLUDED.token
        OR (series.token = EXCLUDED.token AND series.node = EXCLUDED.node
            AND series.generation = EXCLUDED.generation)";

const PG_CLAIM: &str =
    "INSERT INTO series (id, count, sum, min, max, last_ms, node, generation, token)
    VALUES ($1, 0, 0, 0, 0, 0, $2, $3, $4)
    ON CONFLICT (id) DO UPDATE SET
        node = EXCLUDED.node,
        generation = EXCLUDED.generation,
        token = EXCLUDED.token
    WHERE series.token < EXCLUDED.token
        OR (series.token = EXCLUDED.token AND series.node = EXCLUDED.node
            AND series.generation = EXCLUDED.generation)";

const PG_CHECK: &str = "SELECT token, node, generation FROM series WHERE id = $1";

const PG_APPEND: &str = "INSERT INTO writes (series, node, generation, view_id, kind, count, t_ms)
    VALUES ($1, $2, $3, $4, $5, $6, $7)";

const SQLITE_UPSERT: &str =
    "INSERT INTO series (id, count, sum, min, max, last_ms, node, generation, token)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
    ON CONFLICT(id) DO UPDATE SET
        count = series.count + excluded.count,
        sum = series.sum + excluded.sum,
        min = CASE WHEN series.count = 0 THEN excluded.min ELSE MIN(series.min, excluded.min) END,
        max = CASE WHEN series.count = 0 THEN excluded.max ELSE MAX(series.max, excluded.max) END,
        last_ms = MAX(series.last_ms, excluded.last_ms),
        node = excluded.node,
        generation = excluded.generation,
        token = excluded.token
    WHERE series.token < excluded.token
        OR (series.token = excluded.token AND series.node = excluded.node
            AND series.generation = excluded.generation)";

const SQLITE_CLAIM: &str =
    "INSERT INTO series (id, count, sum, min, max, last_ms, node, generation, token)
    VALUES (?1, 0, 0, 0, 0, 0, ?2, ?3, ?4)
    ON CONFLICT(id) DO UPDATE SET
        node = excluded.node,
        generation = excluded.generation,
        token = excluded.token
    WHERE series.token < excluded.token
        OR (series.token = excluded.token AND series.node = excluded.node
            AND series.generation = excluded.generation)";

const SQLITE_CHECK: &str = "SELECT token, node, generation FROM series WHERE id = ?1";

const SQLITE_APPEND: &str =
    "INSERT INTO writes (series, node, generation, view_id, kind, count, t_ms)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    count INTEGER NOT NULL,
    sum REAL NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    last_ms INTEGER NOT NULL,
    node TEXT NOT NULL,
    generation INTEGER NOT NULL,
    token INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS writes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    series INTEGER NOT NULL,
    node TEXT NOT NULL,
    generation INTEGER NOT NULL,
    view_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    count INTEGER NOT NULL,
    t_ms INTEGER NOT NULL
);
";

/// The store's fencing rule, for a write that adds nothing (the statements
/// that write apply the same rule in SQL): a newer token, or the same token
/// by the same writer (the ownership that holds it). Two writers with one
/// token are two owners whose order the tokens could not tell: the first
/// keeps the series.
fn accepts(stored: &(i64, String, i64), token: i64, node: &str, generation: i64) -> bool {
    stored.0 < token || (stored.0 == token && stored.1 == node && stored.2 == generation)
}

fn to_i64(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

fn from_i64(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

/// What the audit of the `writes` table found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Audit {
    /// Points persisted per writer.
    pub persisted: HashMap<Writer, u64>,
    /// Rows written by a writer after another node had taken the series
    /// from it without a relinquish (overlapping ownership).
    pub double_owner_writes: u64,
    /// Series concerned by those rows (at most 20).
    pub double_owner_series: Vec<i64>,
    /// Rows in the table.
    pub rows: u64,
    /// Writes refused because their token was older than the series' (one
    /// per series and write).
    pub stale_writes_refused: u64,
    /// Points of those refused writes, per writer (not persisted).
    pub refused_points: HashMap<Writer, u64>,
}

/// One series' part of a write: the points to add and the token of the
/// writer's ownership of the series.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Delta {
    /// The series.
    pub series: i64,
    /// The fencing token the writer holds the series under.
    pub token: u64,
    /// Points to add (count 0: nothing to add, only the token is checked,
    /// or claimed by an acquire).
    pub agg: Aggregate,
}

/// What a write did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Series whose part was refused (the store holds a newer token), with
    /// the points that were therefore not written.
    pub refused: Vec<(i64, u64)>,
}

impl Store {
    /// Opens (and creates) the store.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn open(url: &StoreUrl) -> Result<Store, StoreError> {
        match url {
            StoreUrl::Sqlite(path) => Store::open_sqlite(path),
            StoreUrl::Postgres(url) => {
                let mut client = postgres::Client::connect(url, postgres::NoTls)?;
                client.batch_execute(PG_SCHEMA)?;
                Ok(Store {
                    conn: Mutex::new(Backend::Postgres(Box::new(client))),
                })
            }
        }
    }

    /// Empties both tables (the driver, before a run).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn reset(&self) -> Result<(), StoreError> {
        match &mut *self.conn() {
            Backend::Sqlite(c) => c.execute_batch("DELETE FROM writes; DELETE FROM series;")?,
            Backend::Postgres(c) => c.batch_execute("TRUNCATE writes, series RESTART IDENTITY")?,
            Backend::Closed => return Err(StoreError::Closed),
        }
        Ok(())
    }

    fn open_sqlite(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        // Files made before fencing tokens have no `token` column.
        let has_token: i64 = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('series') WHERE name = 'token'",
            [],
            |r| r.get(0),
        )?;
        if has_token == 0 {
            conn.execute_batch("ALTER TABLE series ADD COLUMN token INTEGER NOT NULL DEFAULT 0")?;
        }
        Ok(Store {
            conn: Mutex::new(Backend::Sqlite(conn)),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Backend> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes deltas of several series in one transaction: each series'
    /// row is updated if, and only if, the store holds no newer token for
    /// it than the delta's (checked in the statement that writes), and one
    /// `writes` row per series is appended (kind `refused` for a refused
    /// part). An [`WriteKind::Acquire`] claims the series under its token.
    ///
    /// # Errors
    /// [`StoreError`]; nothing is written then.
    pub fn write(
        &self,
        writer: &Writer,
        view_id: u64,
        kind: WriteKind,
        deltas: &[Delta],
        t_ms: i64,
    ) -> Result<WriteOutcome, StoreError> {
        let mut outcome = WriteOutcome::default();
        let generation = to_i64(writer.generation);
        let view = to_i64(view_id);
        let mut guard = self.conn();
        match &mut *guard {
            Backend::Closed => Err(StoreError::Closed),
            Backend::Postgres(c) => {
                let mut tx = c.transaction()?;
                let upsert = tx.prepare(PG_UPSERT)?;
                let claim = tx.prepare(PG_CLAIM)?;
                let check = tx.prepare(PG_CHECK)?;
                let append = tx.prepare(PG_APPEND)?;
                for d in deltas {
                    let token = to_i64(d.token);
                    let count = to_i64(d.agg.count);
                    let accepted = if kind == WriteKind::Acquire {
                        tx.execute(&claim, &[&d.series, &writer.node, &generation, &token])? == 1
                    } else if d.agg.count > 0 {
                        let a = &d.agg;
                        let row: [&(dyn postgres::types::ToSql + Sync); 9] = [
                            &d.series,
                            &count,
                            &a.sum,
                            &a.min,
                            &a.max,
                            &a.last_ms,
                            &writer.node,
                            &generation,
                            &token,
                        ];
                        tx.execute(&upsert, &row)? == 1
                    } else {
                        let stored: Option<(i64, String, i64)> = tx
                            .query_opt(&check, &[&d.series])?
                            .map(|r| (r.get(0), r.get(1), r.get(2)));
                        stored.is_none_or(|s| accepts(&s, token, &writer.node, generation))
                    };
                    let kind = if accepted { kind.as_str() } else { REFUSED };
                    if !accepted {
                        outcome.refused.push((d.series, d.agg.count));
                    }
                    tx.execute(
                        &append,
                        &[
                            &d.series,
                            &writer.node,
                            &generation,
                            &view,
                            &kind,
                            &count,
                            &t_ms,
                        ],
                    )?;
                }
                tx.commit()?;
                Ok(outcome)
            }
            Backend::Sqlite(conn) => {
                // IMMEDIATE: the write lock is taken at BEGIN, where the busy
                // timeout waits for it. A deferred transaction that reads
                // (the token check) and then writes could not wait: SQLite
                // answers "database is locked" at once when another process
                // writes meanwhile (seen as a relinquish failing at
                // start-up, while several nodes write their first acquires).
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                {
                    let mut upsert = tx.prepare_cached(SQLITE_UPSERT)?;
                    let mut claim = tx.prepare_cached(SQLITE_CLAIM)?;
                    let mut check = tx.prepare_cached(SQLITE_CHECK)?;
                    let mut append = tx.prepare_cached(SQLITE_APPEND)?;
                    for d in deltas {
                        let token = to_i64(d.token);
                        let a = &d.agg;
                        let accepted = if kind == WriteKind::Acquire {
                            claim.execute(params![d.series, writer.node, generation, token])? == 1
                        } else if a.count > 0 {
                            upsert.execute(params![
                                d.series,
                                to_i64(a.count),
                                a.sum,
                                a.min,
                                a.max,
                                a.last_ms,
                                writer.node,
                                generation,
                                token
                            ])? == 1
                        } else {
                            let stored: Option<(i64, String, i64)> = check
                                .query_row(params![d.series], |r| {
                                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                                })
                                .optional()?;
                            stored.is_none_or(|s| accepts(&s, token, &writer.node, generation))
                        };
                        let kind = if accepted { kind.as_str() } else { REFUSED };
                        if !accepted {
                            outcome.refused.push((d.series, a.count));
                        }
                        append.execute(params![
                            d.series,
                            writer.node,
                            generation,
                            view,
                            kind,
                            to_i64(a.count),
                            t_ms
                        ])?;
                    }
                }
                tx.commit()?;
                Ok(outcome)
            }
        }
    }

    /// The persisted aggregate of a series (what an acquire loads).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn load(&self, id: i64) -> Result<Option<Aggregate>, StoreError> {
        let mut guard = self.conn();
        let conn = match &mut *guard {
            Backend::Sqlite(c) => c,
            Backend::Closed => return Err(StoreError::Closed),
            Backend::Postgres(c) => {
                let row = c.query_opt(
                    "SELECT count, sum, min, max, last_ms FROM series WHERE id = $1",
                    &[&id],
                )?;
                return Ok(row.map(|r| Aggregate {
                    count: from_i64(r.get(0)),
                    sum: r.get(1),
                    min: r.get(2),
                    max: r.get(3),
                    last_ms: r.get(4),
                }));
            }
        };
        let row = conn
            .query_row(
                "SELECT count, sum, min, max, last_ms FROM series WHERE id = ?1",
                params![id],
                |r| {
                    Ok(Aggregate {
                        count: from_i64(r.get(0)?),
                        sum: r.get(1)?,
                        min: r.get(2)?,
                        max: r.get(3)?,
                        last_ms: r.get(4)?,
                    })
                },
            )
            .optional()?;
        Ok(row)
    }

    /// Sum of `count` over the `series` table.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn total_points(&self) -> Result<u64, StoreError> {
        let mut guard = self.conn();
        let conn = match &mut *guard {
            Backend::Sqlite(c) => c,
            Backend::Closed => return Err(StoreError::Closed),
            Backend::Postgres(c) => {
                let row = c.query_one("SELECT COALESCE(SUM(count), 0)::BIGINT FROM series", &[])?;
                return Ok(from_i64(row.get(0)));
            }
        };
        let n: i64 = conn.query_row("SELECT COALESCE(SUM(count), 0) FROM series", [], |r| {
            r.get(0)
        })?;
        Ok(from_i64(n))
    }

    /// Reads the `writes` table in commit order and audits it.
    ///
    /// Ownership rule: per series, the writer of the latest row holds it;
    /// a `relinquish` row ends the holding. When another writer writes
    /// while the holder has not relinquished, the holder is *superseded*
    /// (a failover: legitimate when the holder is dead). Any later row by
    /// a superseded writer for that series is a double-owner write.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn audit(&self) -> Result<Audit, StoreError> {
        const QUERY: &str = "SELECT series, node, generation, kind, count FROM writes ORDER BY seq";
        let rows: Vec<(i64, String, u64, String, u64)> = match &mut *self.conn() {
            Backend::Sqlite(conn) => {
                let mut stmt = conn.prepare(QUERY)?;
                let rows = stmt.query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        from_i64(r.get::<_, i64>(2)?),
                        r.get::<_, String>(3)?,
                        from_i64(r.get::<_, i64>(4)?),
                    ))
                })?;
                rows.collect::<Result<_, _>>()?
            }
            Backend::Closed => return Err(StoreError::Closed),
            Backend::Postgres(c) => c
                .query(QUERY, &[])?
                .into_iter()
                .map(|r| {
                    (
                        r.get::<_, i64>(0),
                        r.get::<_, String>(1),
                        from_i64(r.get::<_, i64>(2)),
                        r.get::<_, String>(3),
                        from_i64(r.get::<_, i64>(4)),
                    )
                })
                .collect(),
        };
        Ok(audit_rows(rows))
    }
}

/// The ownership audit over rows `(series, node, generation, kind, count)`
/// in commit order (see [`Store::audit`]).
fn audit_rows(rows: Vec<(i64, String, u64, String, u64)>) -> Audit {
    {
        let mut audit = Audit::default();
        // Per series: current holder, and the writers superseded there.
        let mut holder: HashMap<i64, Option<Writer>> = HashMap::new();
        let mut superseded: HashMap<i64, Vec<Writer>> = HashMap::new();
        for (series, node, generation, kind, count) in rows {
            audit.rows += 1;
            if kind == REFUSED {
                // The store kept the series from this writer: no write.
                audit.stale_writes_refused += 1;
                *audit
                    .refused_points
                    .entry(Writer { node, generation })
                    .or_insert(0) += count;
                continue;
            }
            let writer = Writer { node, generation };
            *audit.persisted.entry(writer.clone()).or_insert(0) += count;
            let gone = superseded.entry(series).or_default();
            if gone.contains(&writer) {
                audit.double_owner_writes += 1;
                if audit.double_owner_series.len() < 20
                    && !audit.double_owner_series.contains(&series)
                {
                    audit.double_owner_series.push(series);
                }
                continue;
            }
            let current = holder.entry(series).or_insert(None);
            if let Some(h) = current.as_ref()
                && *h != writer
            {
                gone.push(h.clone());
            }
            *current = if kind == WriteKind::Relinquish.as_str() {
                None
            } else {
                Some(writer)
            };
        }
        audit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(n: u64) -> Aggregate {
        let mut a = Aggregate::default();
        for i in 0..n {
            a.add(i as f64, 1);
        }
        a
    }

    fn w(node: &str, generation: u64) -> Writer {
        Writer {
            node: node.into(),
            generation,
        }
    }

    #[test]
    fn write_load_and_audit_sqlite() {
        let dir = std::env::temp_dir().join(format!("shoal-demo-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.db");
        let _ = std::fs::remove_file(&path);
        let store = Store::open(&StoreUrl::Sqlite(path.clone())).unwrap();
        exercise(&store);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Against a real PostgreSQL server when `SHOAL_TEST_PG_URL` is set
    /// (`.ci/run` starts one); skipped otherwise.
    #[test]
    fn write_load_and_audit_postgres() {
        let Ok(url) = std::env::var("SHOAL_TEST_PG_URL") else {
            eprintln!("SHOAL_TEST_PG_URL not set: PostgreSQL store test skipped");
            return;
        };
        let store = Store::open(&StoreUrl::parse(&url).unwrap()).unwrap();
        exercise(&store);
    }

    fn d(series: i64, token: u64, n: u64) -> Delta {
        Delta {
            series,
            token,
            agg: agg(n),
        }
    }

    fn exercise(store: &Store) {
        store.reset().unwrap();
        let (a, b, c) = (w("a", 1), w("b", 1), w("c", 1));
        let ok = WriteOutcome::default();
        let w1 = store.write(&a, 1, WriteKind::Flush, &[d(1, 1, 3), d(2, 1, 2)], 5);
        assert_eq!(w1.unwrap(), ok);
        // a relinquishes 1 to b: fine.
        let w2 = store.write(&a, 2, WriteKind::Relinquish, &[d(1, 1, 1)], 6);
        assert_eq!(w2.unwrap(), ok);
        let w3 = store.write(&b, 2, WriteKind::Acquire, &[d(1, 2, 0)], 7);
        assert_eq!(w3.unwrap(), ok);
        let w4 = store.write(&b, 2, WriteKind::Flush, &[d(1, 2, 4)], 8);
        assert_eq!(w4.unwrap(), ok);
        // c takes 2 from a without a relinquish (failover) under a newer
        // token; a (paused past its lease) then writes 2 again under its old
        // token, and a zero-point relinquish: both refused, in the store.
        let w5 = store.write(&c, 3, WriteKind::Acquire, &[d(2, 3, 0)], 9);
        assert_eq!(w5.unwrap(), ok);
        let w6 = store.write(&a, 3, WriteKind::Flush, &[d(2, 1, 1), d(1, 1, 0)], 10);
        assert_eq!(w6.unwrap().refused, vec![(2, 1), (1, 0)]);
        let w7 = store.write(&c, 3, WriteKind::Flush, &[d(2, 3, 1)], 11);
        assert_eq!(w7.unwrap(), ok);
        // An acquire under an older token than the store's is refused too.
        let w8 = store.write(&a, 4, WriteKind::Acquire, &[d(2, 2, 0)], 12);
        assert_eq!(w8.unwrap().refused, vec![(2, 0)]);
        // An equal token by another writer is a second owner the tokens
        // could not order: refused; the holder of the token goes on.
        let w9 = store.write(&b, 5, WriteKind::Flush, &[d(2, 3, 1)], 13);
        assert_eq!(w9.unwrap().refused, vec![(2, 1)]);
        let w10 = store.write(&c, 5, WriteKind::Flush, &[d(2, 3, 2)], 14);
        assert_eq!(w10.unwrap(), ok);
        let loaded = store.load(1).unwrap().unwrap();
        assert_eq!(loaded.count, 8);
        assert_eq!(store.total_points().unwrap(), 8 + 2 + 3);
        assert_eq!(store.load(2).unwrap().unwrap().count, 5);
        let audit = store.audit().unwrap();
        assert_eq!(audit.double_owner_writes, 0);
        assert_eq!(audit.stale_writes_refused, 4);
        assert_eq!(audit.persisted[&a], 6);
        assert_eq!(audit.persisted[&b], 4);
        assert_eq!(audit.persisted[&c], 3);
        assert_eq!(audit.rows, 12);
        assert!((loaded.sum - (3.0 + 0.0 + 6.0)).abs() < 1e-9);
        assert_eq!((loaded.min, loaded.max), (0.0, 3.0));
    }

    /// The audit still catches a writer that kept writing after a failover
    /// when no token stopped it (a store without fencing).
    #[test]
    fn audit_flags_writes_after_a_takeover() {
        let rows = vec![
            (2, "a".to_string(), 1, "flush".to_string(), 1),
            (2, "c".to_string(), 1, "flush".to_string(), 1),
            (2, "a".to_string(), 1, "flush".to_string(), 1),
            (2, "a".to_string(), 1, REFUSED.to_string(), 1),
        ];
        let audit = audit_rows(rows);
        assert_eq!(audit.double_owner_writes, 1);
        assert_eq!(audit.double_owner_series, vec![2]);
        assert_eq!(audit.stale_writes_refused, 1);
    }

    #[test]
    fn urls() {
        assert_eq!(
            StoreUrl::parse("sqlite:/tmp/x.db").unwrap(),
            StoreUrl::Sqlite("/tmp/x.db".into())
        );
        assert!(StoreUrl::parse("mysql://x").is_err());
    }
}
