//! What the SQLite and PostgreSQL stores share: the statements both dialects run word for
//! word (numbered `$n` parameters, which both accept), and the decoding of rows into
//! domain values. Each store keeps only what its dialect does differently: the twin
//! list's metadata filter, batch writes (`json_each` against `UNNEST`), transactions and
//! error codes.
//!
//! Both keep times as Unix nanoseconds in a 64-bit integer and JSON as text (SQLite) or
//! `jsonb` (PostgreSQL); a row's JSON column is read through [`Columns::json`].

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;

use super::{OutboxEntry, OutboxEvent, StoreError, StoreResult};
use crate::domain::document::{Document, DocumentSummary, VersionSummary, WriteOp, Writer};
use crate::domain::sampling::Write;
use crate::domain::state::State;
use crate::domain::time::from_nanos;
use crate::domain::twin::Twin;

pub const TWIN_COLUMNS: &str = "id, owner, name, revision, created, updated, definitions, metadata";

pub const INSERT_TWIN: &str = "INSERT INTO twins
    (id, owner, name, revision, created, updated, definitions, metadata)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

pub const UPDATE_TWIN: &str = "UPDATE twins
    SET name = $1, revision = $2, updated = $3, definitions = $4, metadata = $5
    WHERE id = $6 AND owner = $7 AND revision = $8";

pub const SELECT_TWIN: &str =
    "SELECT id, owner, name, revision, created, updated, definitions, metadata
    FROM twins WHERE id = $1 AND owner = $2";

pub const SELECT_ANY_TWIN: &str =
    "SELECT id, owner, name, revision, created, updated, definitions, metadata
    FROM twins WHERE id = $1";

/// The twins whose ids are in the array `$1` (PostgreSQL; SQLite spells out the list).
pub const SELECT_ANY_TWINS: &str =
    "SELECT id, owner, name, revision, created, updated, definitions, metadata
    FROM twins WHERE id = ANY($1)";

/// Id, owner, the revision it must have (any when null).
pub const DELETE_TWIN: &str =
    "DELETE FROM twins WHERE id = $1 AND owner = $2 AND ($3 IS NULL OR revision = $3)";

/// What goes with a deleted twin, each bound to its id.
pub const DELETE_TWIN_ROWS: [&str; 6] = [
    "DELETE FROM twin_attributes WHERE twin_id = $1",
    "DELETE FROM states WHERE twin_id = $1",
    "DELETE FROM ingest_cursors WHERE twin_id = $1",
    "DELETE FROM documents WHERE twin_id = $1",
    "DELETE FROM document_revisions WHERE twin_id = $1",
    "DELETE FROM state_breaks WHERE twin_id = $1",
];

pub const DELETE_ATTRIBUTES: &str = "DELETE FROM twin_attributes WHERE twin_id = $1";

pub const INSERT_ATTRIBUTE: &str =
    "INSERT INTO twin_attributes (twin_id, channel, subtopic) VALUES ($1, $2, $3)";

/// Channel, subtopic, wildcard subtopic.
pub const IDS_BY_ATTRIBUTE: &str = "SELECT DISTINCT twin_id FROM twin_attributes
    WHERE channel = $1 AND (subtopic = $2 OR subtopic = $3)";

/// Definition, created, payload, twin id, id (the same order for both statements).
pub const INSERT_STATE: &str =
    "INSERT INTO states (definition, created, payload, twin_id, id) VALUES ($1, $2, $3, $4, $5)";
pub const UPDATE_STATE: &str =
    "UPDATE states SET definition = $1, created = $2, payload = $3 WHERE twin_id = $4 AND id = $5";

/// Maps sqlx errors onto the store's error kinds, keeping the error as the source: a
/// failed or cut connection (a connection cut halfway through an answer reads as a
/// malformed message) and the database codes `transient_code` names are unavailable, a
/// unique violation is a conflict, anything else internal.
pub fn map_err(e: sqlx::Error, transient_code: fn(Option<&str>) -> bool) -> StoreError {
    let unavailable = match &e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => true,
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            return StoreError::Conflict(e.into());
        }
        sqlx::Error::Database(db) => transient_code(db.code().as_deref()),
        _ => false,
    };
    if unavailable {
        StoreError::Unavailable(e.into())
    } else {
        StoreError::Internal(e.into())
    }
}

/// The statement of a state write and the state it binds.
pub fn state_write(write: &Write) -> (&'static str, &State) {
    match write {
        Write::Insert(s) => (INSERT_STATE, s),
        Write::Update(s) => (UPDATE_STATE, s),
    }
}

pub const LATEST_STATE: &str = "SELECT twin_id, id, definition, created, payload FROM states
    WHERE twin_id = $1 ORDER BY id DESC LIMIT 1";

pub const LATEST_STATE_ID: &str =
    "SELECT id FROM states WHERE twin_id = $1 ORDER BY id DESC LIMIT 1";

/// Twin id: its first and latest state ids (both null without states). Retention
/// removes states from the first id on, so the ids in between are all there.
pub const STATE_ID_BOUNDS: &str = "SELECT
    (SELECT id FROM states WHERE twin_id = $1 ORDER BY id LIMIT 1) AS first,
    (SELECT id FROM states WHERE twin_id = $1 ORDER BY id DESC LIMIT 1) AS last";

/// Twin id, from, to (Unix ns, both inclusive): the states of a window.
pub const RANGE_COUNT: &str =
    "SELECT COUNT(*) FROM states WHERE twin_id = $1 AND created >= $2 AND created <= $3";

/// Twin id, from, to, limit, offset: a page of a window in history order. The page is
/// found on the (twin, created) index alone (ids only), then its rows are read, so a deep
/// offset skips index entries, not rows.
pub const RANGE_PAGE: &str = "SELECT s.twin_id, s.id, s.definition, s.created, s.payload
    FROM (SELECT id FROM states WHERE twin_id = $1 AND created >= $2 AND created <= $3
          ORDER BY created, id LIMIT $4 OFFSET $5) AS p
    JOIN states AS s ON s.twin_id = $1 AND s.id = p.id
    ORDER BY s.created, s.id";

/// Twin id, from, to (Unix ns, both inclusive): where the twin's history stands and
/// where the window falls in it, in one statement (one snapshot): the first kept id, the
/// twin's last break of time order ([`WindowShape`]), and the first and last ids of the
/// window in history order, each one seek on an index.
pub const WINDOW_SHAPE: &str = "SELECT
    (SELECT id FROM states WHERE twin_id = $1 ORDER BY id LIMIT 1) AS first,
    (SELECT last_break FROM state_breaks WHERE twin_id = $1) AS last_break,
    (SELECT id FROM states WHERE twin_id = $1 AND created >= $2
        ORDER BY created, id LIMIT 1) AS lo,
    (SELECT id FROM states WHERE twin_id = $1 AND created <= $3
        ORDER BY created DESC, id DESC LIMIT 1) AS hi";

/// Twin id, first id, last id: a run of states by id.
pub const STATES_BETWEEN: &str = "SELECT twin_id, id, definition, created, payload FROM states
    WHERE twin_id = $1 AND id >= $2 AND id <= $3 ORDER BY id";

/// Every twin's last break of time order, from the states themselves: run once, when
/// the table that keeps them is created in a database that has states.
pub const START_STATE_BREAKS: &str = "INSERT INTO state_breaks (twin_id, last_break)
    SELECT twin_id, MAX(id) FROM (
        SELECT twin_id, id, created < LAG(created) OVER (PARTITION BY twin_id ORDER BY id) AS b
        FROM states) AS s
    WHERE b GROUP BY twin_id";

/// The statements that keep a twin's last break of time order, `$greatest` being the
/// backend's two-argument maximum. [0]: twin id, id: records a break the caller found.
/// [1]: twin id, first id, last id: finds and records the breaks among those states
/// (each compared with the state before it, stored or among them).
macro_rules! state_breaks {
    ($greatest:literal) => {
        [
            concat!(
                "INSERT INTO state_breaks (twin_id, last_break) VALUES ($1, $2)
                ON CONFLICT (twin_id) DO UPDATE
                SET last_break = ",
                $greatest,
                "(state_breaks.last_break, excluded.last_break)"
            ),
            concat!(
                "INSERT INTO state_breaks (twin_id, last_break)
                SELECT s.twin_id, MAX(s.id) FROM states AS s
                JOIN states AS p ON p.twin_id = s.twin_id AND p.id = s.id - 1
                WHERE s.twin_id = $1 AND s.id >= $2 AND s.id <= $3 AND s.created < p.created
                GROUP BY s.twin_id
                ON CONFLICT (twin_id) DO UPDATE
                SET last_break = ",
                $greatest,
                "(state_breaks.last_break, excluded.last_break)"
            ),
        ]
    };
}
pub(crate) use state_breaks;

/// Twin id, time: the state in force then.
pub const STATE_AT: &str = "SELECT twin_id, id, definition, created, payload FROM states
    WHERE twin_id = $1 AND created <= $2 ORDER BY created DESC, id DESC LIMIT 1";

/// After id, limit: the walk of retention over every twin.
pub const TWIN_IDS_AFTER: &str = "SELECT id FROM twins WHERE id > $1 ORDER BY id LIMIT $2";

/// Twin id, limit: the first states' ids and times, which retention may remove.
pub const FIRST_STATES: &str =
    "SELECT id, created FROM states WHERE twin_id = $1 ORDER BY id LIMIT $2";

/// Twin id, first id kept.
pub const DELETE_STATES_BEFORE: &str = "DELETE FROM states WHERE twin_id = $1 AND id < $2";

/// Twin id, first id, limit.
pub const STATES_FROM: &str = "SELECT twin_id, id, definition, created, payload FROM states
    WHERE twin_id = $1 AND id >= $2 ORDER BY id LIMIT $3";

pub const DOCUMENT_SUMMARIES: &str =
    "SELECT name, version, updated FROM documents WHERE twin_id = $1 ORDER BY name";

pub const SELECT_DOCUMENT: &str =
    "SELECT twin_id, name, version, updated, data FROM documents WHERE twin_id = $1 AND name = $2";

pub const DOCUMENT_VERSION: &str = "SELECT version FROM documents WHERE twin_id = $1 AND name = $2";

/// Twin id, name, version, updated, data.
pub const CREATE_DOCUMENT: &str = "INSERT INTO documents (twin_id, name, version, updated, data)
    VALUES ($1, $2, $3, $4, $5) ON CONFLICT (twin_id, name) DO NOTHING";

/// Twin id, name, new version, updated, data, expected version.
pub const REPLACE_DOCUMENT: &str = "UPDATE documents SET version = $3, updated = $4, data = $5
    WHERE twin_id = $1 AND name = $2 AND version = $6";

/// The conditional write of a document: [`CREATE_DOCUMENT`] when it must not exist yet,
/// [`REPLACE_DOCUMENT`] (one more parameter, the expected version) when it must have a
/// given version.
pub fn document_write(expected: Option<i64>) -> &'static str {
    match expected {
        None => CREATE_DOCUMENT,
        Some(_) => REPLACE_DOCUMENT,
    }
}

/// Twin id, name, expected version (any when null).
pub const DELETE_DOCUMENT: &str =
    "DELETE FROM documents WHERE twin_id = $1 AND name = $2 AND ($3 IS NULL OR version = $3)";

/// Twin id, name, version, updated, data, op, writer kind, writer id: the revision of a
/// version just written. A row left at that version (there should be none: deletes take
/// a document's revisions with it) is replaced, never left to fail the write.
pub const PUT_REVISION: &str = "INSERT INTO document_revisions
    (twin_id, name, version, updated, data, op, by_kind, by_id)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    ON CONFLICT (twin_id, name, version) DO UPDATE SET updated = excluded.updated,
    data = excluded.data, op = excluded.op, by_kind = excluded.by_kind, by_id = excluded.by_id";

/// Twin id, name, oldest version to keep.
pub const PRUNE_REVISIONS: &str =
    "DELETE FROM document_revisions WHERE twin_id = $1 AND name = $2 AND version < $3";

/// Twin id, name: every revision of a deleted document.
pub const DELETE_REVISIONS: &str =
    "DELETE FROM document_revisions WHERE twin_id = $1 AND name = $2";

/// Twin id, name.
pub const COUNT_REVISIONS: &str =
    "SELECT COUNT(*) FROM document_revisions WHERE twin_id = $1 AND name = $2";

/// Twin id, name, limit, offset: newest first, along the primary key.
pub const REVISION_PAGE: &str = "SELECT version, updated, op, by_kind, by_id
    FROM document_revisions WHERE twin_id = $1 AND name = $2
    ORDER BY version DESC LIMIT $3 OFFSET $4";

/// Twin id, name, version.
pub const SELECT_REVISION: &str = "SELECT twin_id, name, version, updated, data
    FROM document_revisions WHERE twin_id = $1 AND name = $2 AND version = $3";

/// Twin id, name, time (Unix ns): the newest revision written at or before it, found by
/// walking the primary key back from the newest (at most the kept revisions).
pub const REVISION_AT: &str = "SELECT twin_id, name, version, updated, data
    FROM document_revisions WHERE twin_id = $1 AND name = $2 AND updated <= $3
    ORDER BY version DESC LIMIT 1";

/// Group, start position, holder, until, now: the group's position when `holder` has
/// (or now takes) its lease, no row while another holder's lease runs.
pub const TAKE_LEASE: &str =
    "INSERT INTO ingest_groups (grp, seq, holder, until) VALUES ($1, $2, $3, $4)
    ON CONFLICT (grp) DO UPDATE SET holder = excluded.holder, until = excluded.until
    WHERE ingest_groups.holder = excluded.holder OR ingest_groups.until < $5
    RETURNING seq";

pub const RELEASE_LEASE: &str = "UPDATE ingest_groups SET until = 0 WHERE grp = $1 AND holder = $2";

/// New position, group, expected position.
pub const MOVE_POSITION: &str = "UPDATE ingest_groups SET seq = $1 WHERE grp = $2 AND seq = $3";

pub const TWIN_SEQ: &str = "SELECT seq FROM ingest_cursors WHERE twin_id = $1";

pub const FORGET_SEQS: &str = "DELETE FROM ingest_cursors";

/// After id ($1, '' for the first), limit ($2).
pub const TWINS_AFTER: &str =
    "SELECT id, owner, name, revision, created, updated, definitions, metadata
    FROM twins WHERE id > $1 ORDER BY id LIMIT $2";

pub const GROUP_POSITIONS: &str = "SELECT grp, seq FROM ingest_groups ORDER BY grp";
/// The sequences of twins that have states: a sequence above 0 of a twin with no state
/// (a deleted twin's, say) says nothing the group's position does not, and MongoDB,
/// which keeps a twin's sequence on its latest state, could not hold it.
pub const TWIN_SEQS: &str = "SELECT c.twin_id, c.seq FROM ingest_cursors c
    WHERE c.seq > 0 AND EXISTS (SELECT 1 FROM states s WHERE s.twin_id = c.twin_id)
    ORDER BY c.twin_id";

/// Group, position: a copied group holds no lease.
pub const PUT_GROUP: &str =
    "INSERT INTO ingest_groups (grp, seq, holder, until) VALUES ($1, $2, '', 0)
    ON CONFLICT (grp) DO UPDATE SET seq = excluded.seq, holder = '', until = 0";

pub const PUT_TWIN_SEQ: &str = "INSERT INTO ingest_cursors (twin_id, seq) VALUES ($1, $2)
    ON CONFLICT (twin_id) DO UPDATE SET seq = excluded.seq";

pub const COUNTS: &str = "SELECT (SELECT COUNT(*) FROM twins), (SELECT COUNT(*) FROM states),
    (SELECT COUNT(*) FROM documents), (SELECT COUNT(*) FROM ingest_groups),
    (SELECT COUNT(*) FROM ingest_cursors c
        WHERE c.seq > 0 AND EXISTS (SELECT 1 FROM states s WHERE s.twin_id = c.twin_id)),
    (SELECT COUNT(*) FROM document_revisions)";

/// The counts of [`COUNTS`]' row.
pub fn counts(
    (twins, states, documents, groups, cursors, revisions): (i64, i64, i64, i64, i64, i64),
) -> super::transfer::Counts {
    let n = |v: i64| v.max(0) as u64;
    super::transfer::Counts {
        twins: n(twins),
        states: n(states),
        documents: n(documents),
        revisions: n(revisions),
        groups: n(groups),
        cursors: n(cursors),
    }
}

/// Rows of [`GROUP_POSITIONS`] or [`TWIN_SEQS`] as stream positions.
pub fn positions(rows: Vec<(String, i64)>) -> Vec<(String, u64)> {
    rows.into_iter().map(|(k, v)| (k, seq_of(v))).collect()
}

/// Reads a row's columns by name; each store implements it for its row type.
pub trait Columns {
    fn text(&self, column: &str) -> StoreResult<String>;
    fn int(&self, column: &str) -> StoreResult<i64>;
    /// A nullable floating-point column.
    fn float(&self, column: &str) -> StoreResult<Option<f64>>;
    /// A JSON column, deserialized; `what` names it in the error of a corrupt value.
    fn json<T: DeserializeOwned>(&self, column: &str, what: &str) -> StoreResult<T>;
}

/// A twin row's id with the twin, decoded on its own: a row that cannot be decoded
/// fails alone (see [`super::TwinRepository::retrieve_many`]).
pub fn twin_with_id(row: &impl Columns) -> StoreResult<(String, StoreResult<Twin>)> {
    Ok((row.text("id")?, twin_from_row(row)))
}

pub fn twin_from_row(row: &impl Columns) -> StoreResult<Twin> {
    Ok(Twin {
        id: row.text("id")?,
        owner: row.text("owner")?,
        name: row.text("name")?,
        revision: row.int("revision")?,
        created: from_nanos(row.int("created")?),
        updated: from_nanos(row.int("updated")?),
        definitions: row.json("definitions", "definitions")?,
        metadata: row.json("metadata", "metadata")?,
    })
}

pub fn state_from_row(row: &impl Columns) -> StoreResult<State> {
    Ok(State {
        twin_id: row.text("twin_id")?,
        id: row.int("id")?,
        definition: row.int("definition")?,
        created: from_nanos(row.int("created")?),
        payload: row.json("payload", "payload")?,
    })
}

pub fn document_from_row(row: &impl Columns) -> StoreResult<Document> {
    Ok(Document {
        twin_id: row.text("twin_id")?,
        document_name: row.text("name")?,
        version: row.int("version")?,
        updated: from_nanos(row.int("updated")?),
        data: row.json("data", "document")?,
    })
}

/// A row of [`REVISION_PAGE`].
pub fn version_from_row(row: &impl Columns) -> StoreResult<VersionSummary> {
    let (op, kind) = (row.text("op")?, row.text("by_kind")?);
    Ok(VersionSummary {
        version: row.int("version")?,
        updated: from_nanos(row.int("updated")?),
        op: WriteOp::parse(&op)
            .ok_or_else(|| StoreError::Internal(format!("corrupt revision: op {op:?}").into()))?,
        by: Writer::from_parts(&kind, &row.text("by_id")?).ok_or_else(|| {
            StoreError::Internal(format!("corrupt revision: writer kind {kind:?}").into())
        })?,
    })
}

pub fn summary_from_row(row: &impl Columns) -> StoreResult<DocumentSummary> {
    Ok(DocumentSummary {
        document_name: row.text("name")?,
        version: row.int("version")?,
        updated: from_nanos(row.int("updated")?),
    })
}

/// A page's total and the id its first state has, from the first and latest state
/// ids ([`STATE_ID_BOUNDS`]): ids are a gap-free run, from 0 until retention removes
/// the oldest.
pub fn states_span(first: Option<i64>, last: Option<i64>, offset: u64) -> (u64, i64) {
    match (first, last) {
        (Some(first), Some(last)) if last >= first => (
            u64::try_from(last - first).map_or(0, |n| n + 1),
            first.saturating_add(to_i64(offset)),
        ),
        _ => (0, 0),
    }
}

/// Where a window falls in a twin's history ([`WINDOW_SHAPE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowShape {
    /// The first kept state's id.
    pub first: Option<i64>,
    /// The greatest id of a state created before the state before it.
    pub last_break: Option<i64>,
    /// The window's first and last states in history order.
    pub lo: Option<i64>,
    pub hi: Option<i64>,
}

/// The columns of [`WINDOW_SHAPE`] in order.
pub type WindowShapeRow = (Option<i64>, Option<i64>, Option<i64>, Option<i64>);

impl From<WindowShapeRow> for WindowShape {
    fn from((first, last_break, lo, hi): WindowShapeRow) -> Self {
        Self {
            first,
            last_break,
            lo,
            hi,
        }
    }
}

impl WindowShape {
    /// When the kept history is in time order (no break after its first state), the
    /// window is the run of ids `lo..=hi`: its size and that run (None when empty).
    /// None when the history is out of order: the window must be counted and paged on
    /// the time index.
    pub fn ids(&self) -> Option<(u64, Option<(i64, i64)>)> {
        let ordered = match (self.first, self.last_break) {
            (Some(first), Some(b)) => b <= first,
            _ => true,
        };
        if !ordered {
            return None;
        }
        Some(match (self.lo, self.hi) {
            (Some(lo), Some(hi)) if lo <= hi => {
                (u64::try_from(hi - lo).map_or(0, |n| n + 1), Some((lo, hi)))
            }
            _ => (0, None),
        })
    }

    /// The ids of `page` of an in-order window (None when the page is past its end).
    pub fn page_ids(
        run: Option<(i64, i64)>,
        page: crate::domain::PageRequest,
    ) -> Option<(i64, i64)> {
        let (lo, hi) = run?;
        let start = lo.saturating_add(to_i64(page.offset));
        if start > hi || page.limit == 0 {
            return None;
        }
        Some((start, hi.min(start.saturating_add(to_i64(page.limit) - 1))))
    }
}

/// Each twin's first and last ids among `states`, in the order twins first appear.
pub fn id_runs(states: &[State]) -> Vec<(&str, i64, i64)> {
    let mut runs: Vec<(&str, i64, i64)> = Vec::new();
    for s in states {
        match runs.iter_mut().find(|r| r.0 == s.twin_id) {
            Some(r) => {
                r.1 = r.1.min(s.id);
                r.2 = r.2.max(s.id);
            }
            None => runs.push((&s.twin_id, s.id, s.id)),
        }
    }
    runs
}

/// The parts of an attribute's summary a SQL store aggregates ([`super::Aggregate`]),
/// from a row with the columns `name count min max mean first_created last_created`.
pub fn aggregate_from_row(row: &impl Columns) -> StoreResult<super::Aggregate> {
    Ok(super::Aggregate {
        name: row.text("name")?,
        count: seq_of(row.int("count")?),
        min: row.json("min", "summary")?,
        max: row.json("max", "summary")?,
        mean: row.float("mean")?,
        first_created: row.int("first_created")?,
        last_created: row.int("last_created")?,
    })
}

/// A slice's aggregate of one attribute: the sum and number of its numeric values
/// in place of their mean, so that slices merge.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryPart {
    pub aggregate: super::Aggregate,
    pub sum: f64,
    pub numbers: u64,
}

/// From a row with the columns `name count min max sum numbers first_created
/// last_created`.
pub fn summary_part_from_row(row: &impl Columns) -> StoreResult<SummaryPart> {
    Ok(SummaryPart {
        aggregate: super::Aggregate {
            name: row.text("name")?,
            count: seq_of(row.int("count")?),
            min: row.json("min", "summary")?,
            max: row.json("max", "summary")?,
            mean: None,
            first_created: row.int("first_created")?,
            last_created: row.int("last_created")?,
        },
        sum: row.float("sum")?.unwrap_or(0.0),
        numbers: seq_of(row.int("numbers")?),
    })
}

/// Slices' parts merged per attribute.
#[derive(Debug, Default)]
pub struct SummaryParts(std::collections::BTreeMap<String, SummaryPart>);

impl SummaryParts {
    pub fn add(&mut self, part: SummaryPart) {
        let Some(m) = self.0.get_mut(&part.aggregate.name) else {
            self.0.insert(part.aggregate.name.clone(), part);
            return;
        };
        let (a, b) = (&mut m.aggregate, part.aggregate);
        a.count += b.count;
        if extreme(&b.min, &a.min, std::cmp::Ordering::Less) {
            a.min = b.min;
        }
        if extreme(&b.max, &a.max, std::cmp::Ordering::Greater) {
            a.max = b.max;
        }
        a.first_created = a.first_created.min(b.first_created);
        a.last_created = a.last_created.max(b.last_created);
        m.sum += part.sum;
        m.numbers += part.numbers;
    }

    /// The merged aggregates, each with the mean of its numeric values.
    pub fn into_aggregates(self) -> Vec<super::Aggregate> {
        self.0
            .into_values()
            .map(|p| {
                let mut a = p.aggregate;
                a.mean = (p.numbers > 0).then(|| p.sum / p.numbers as f64);
                a
            })
            .collect()
    }
}

/// Whether the number `candidate` is beyond `current` in the direction `way` (a null,
/// no number in that slice, never is; any number is beyond a null).
fn extreme(
    candidate: &serde_json::Value,
    current: &serde_json::Value,
    way: std::cmp::Ordering,
) -> bool {
    match (candidate.as_f64(), current.as_f64()) {
        (Some(c), Some(cur)) => c.total_cmp(&cur) == way,
        (Some(_), None) => true,
        _ => false,
    }
}

/// The value of `name` in a payload row of a summary's lookup.
pub fn payload_value(row: &impl Columns, name: &str) -> StoreResult<Option<serde_json::Value>> {
    let mut payload: crate::domain::state::Payload = row.json("payload", "payload")?;
    Ok(payload.remove(name))
}

/// A stream sequence or position as stored (a signed 64-bit integer).
pub fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored sequence or position as the stream counts it.
pub fn seq_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The oldest `$1` entries of the outbox, in id order.
pub const PENDING_EVENTS: &str =
    "SELECT id, msg_id, owner, payload FROM feed_outbox ORDER BY id LIMIT $1";

/// The oldest `$2` entries of the outbox with an id above `$1`, in id order.
pub const PENDING_EVENTS_AFTER: &str =
    "SELECT id, msg_id, owner, payload FROM feed_outbox WHERE id > $1 ORDER BY id LIMIT $2";

pub const OUTBOX_BACKLOG: &str = "SELECT COUNT(*) FROM feed_outbox";

/// An outbox row.
pub fn outbox_from_row(row: &impl Columns) -> StoreResult<OutboxEntry> {
    OutboxEntry::stored(
        row.int("id")?,
        row.text("msg_id")?,
        row.text("owner")?,
        row.text("payload")?,
    )
}

/// The outbox rows of `events`, as (message id, owner, payload) columns; each event
/// stamped with `at` when given, else with its own time.
pub fn outbox_columns<'a>(
    events: impl IntoIterator<Item = &'a OutboxEvent>,
    at: Option<DateTime<Utc>>,
) -> StoreResult<(Vec<&'a str>, Vec<&'a str>, Vec<String>)> {
    let mut columns = (Vec::new(), Vec::new(), Vec::new());
    for e in events {
        columns.0.push(e.msg_id.as_str());
        columns.1.push(e.owner.as_str());
        columns.2.push(match at {
            Some(time) => e.payload_at(time)?,
            None => e.payload()?,
        });
    }
    Ok(columns)
}
