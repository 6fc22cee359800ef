//! `twins migrate --from <url> --to <url> [--batch N]`: copies a deployment's data from
//! one store to another — twins, then each twin's states and documents, then the ingest
//! log (group positions and twin sequences) — and checks the counts at the end.
//!
//! The service must not write to the source while it runs (stop it, or at least stop
//! ingestion and writes): the ingest positions are copied last, so the target resumes
//! ingestion from exactly where the source stopped. Every write is idempotent, so a run
//! that was interrupted is finished by running the same command again: twins and
//! documents that are already there are compared and rewritten only when they differ,
//! and a twin's states continue after the target's latest one.
//!
//! Any two stores: `sqlite://`, `postgres://`, `mongodb://`. MongoDB keeps a twin's
//! sequence on its latest state rather than in a table (see the MongoDB store's
//! `transfer` module), so only sequences of twins with states are copied and counted,
//! on every store.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::error::{chain, redact_url};
use crate::store::transfer::{Counts, Transfer};
use crate::store::{DocumentWrite, Store, StoreError};

/// States per read and write by default.
const DEFAULT_BATCH: usize = 5_000;
/// Seconds between progress lines.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// `twins migrate --from <url> --to <url> [--batch N]`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
#[command(
    after_help = "Stop the service before the copy (the ingest positions are copied last); run the same command again to finish an interrupted copy."
)]
pub struct Args {
    /// Database URL to copy from (sqlite://, postgres://, mongodb://).
    #[arg(long, value_name = "DATABASE URL")]
    pub from: String,
    /// Database URL to copy into: empty, or the target of an earlier run.
    #[arg(long, value_name = "DATABASE URL")]
    pub to: String,
    /// States per read and write.
    #[arg(long, default_value_t = DEFAULT_BATCH, value_parser = batch_size)]
    pub batch: usize,
}

fn batch_size(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("a whole number of at least 1".into()),
    }
}

/// `twins migrate ...`: exit code 0 when everything was copied and counted, 1 when the
/// copy failed or the counts differ, 2 for bad arguments.
pub fn main(args: &Args) -> ExitCode {
    if args.from == args.to {
        eprintln!("twins migrate: --from and --to name the same database");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("twins migrate: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(counts) => {
            eprintln!(
                "twins migrate: done: {} twins, {} states, {} documents ({} revisions), {} groups, {} twin sequences; counts equal",
                counts.twins,
                counts.states,
                counts.documents,
                counts.revisions,
                counts.groups,
                counts.cursors
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("twins migrate: {e}");
            ExitCode::from(1)
        }
    }
}

async fn open(url: &str) -> Result<(Store, std::sync::Arc<dyn Transfer>), String> {
    let store = Store::connect(url)
        .await
        .map_err(|e| format!("cannot open {}: {}", redact_url(url), chain(&e)))?;
    let transfer = store.transfer.clone().ok_or(format!(
        "{}: this store cannot be migrated",
        redact_url(url)
    ))?;
    Ok((store, transfer))
}

fn failed(what: &str) -> impl Fn(StoreError) -> String + '_ {
    move |e| format!("{what}: {}", chain(&e))
}

/// Copies everything and returns the counts, equal on both sides.
pub async fn run(args: &Args) -> Result<Counts, String> {
    let (source, from) = open(&args.from).await?;
    let (target, to) = open(&args.to).await?;
    let total = from.counts().await.map_err(failed("counting the source"))?;
    let started = Instant::now();
    let mut progress = Progress {
        total,
        done: Counts::default(),
        started,
        last: started,
    };
    let mut after: Option<String> = None;
    loop {
        let twins = from
            .twins_after(after.as_deref(), 100)
            .await
            .map_err(failed("reading twins"))?;
        let Some(last) = twins.last() else { break };
        after = Some(last.id.clone());
        for twin in &twins {
            match target
                .twins
                .retrieve_any(&twin.id)
                .await
                .map_err(failed("reading a twin of the target"))?
            {
                None => target
                    .twins
                    .save(twin)
                    .await
                    .map_err(failed("writing a twin"))?,
                Some(t) if &t != twin => {
                    if !target
                        .twins
                        .update(twin, t.revision)
                        .await
                        .map_err(failed("rewriting a twin"))?
                    {
                        return Err(format!("twin {} changed in the target meanwhile", twin.id));
                    }
                }
                Some(_) => {}
            }
            progress.done.twins += 1;
            copy_states(
                &source,
                &target,
                to.as_ref(),
                &twin.id,
                args.batch,
                &mut progress,
            )
            .await?;
            copy_documents(&source, &target, &twin.id, &mut progress).await?;
        }
    }
    let log = from
        .ingest_log()
        .await
        .map_err(failed("reading the ingest log"))?;
    to.put_ingest_log(&log)
        .await
        .map_err(failed("writing the ingest log"))?;
    let copied = to.counts().await.map_err(failed("counting the target"))?;
    let now = from.counts().await.map_err(failed("counting the source"))?;
    if copied != now {
        return Err(format!(
            "counts differ: source {now:?}, target {copied:?} (was the source written to meanwhile, or the target not empty?)"
        ));
    }
    Ok(copied)
}

async fn copy_states(
    source: &Store,
    target: &Store,
    to: &dyn Transfer,
    twin_id: &str,
    batch: usize,
    progress: &mut Progress,
) -> Result<(), String> {
    // A twin's state ids are one unbroken run (from 0, or from the oldest retention
    // kept): the target's latest says where to go on, counted from the source's first.
    let first = source
        .states
        .list(
            twin_id,
            crate::domain::PageRequest {
                offset: 0,
                limit: 1,
            },
        )
        .await
        .map_err(failed("reading states"))?;
    let Some(first_id) = first.items.first().map(|s| s.id) else {
        return Ok(());
    };
    let mut next = match target
        .states
        .latest(twin_id)
        .await
        .map_err(failed("reading the target's latest state"))?
    {
        Some(s) => u64::try_from(s.id + 1 - first_id).unwrap_or(0),
        None => 0,
    };
    progress.done.states += next;
    loop {
        let page = source
            .states
            .list(
                twin_id,
                crate::domain::PageRequest {
                    offset: next,
                    limit: batch as u64,
                },
            )
            .await
            .map_err(failed("reading states"))?;
        if page.items.is_empty() {
            return Ok(());
        }
        to.put_states(&page.items)
            .await
            .map_err(failed("writing states"))?;
        next += page.items.len() as u64;
        progress.done.states += page.items.len() as u64;
        progress.tick();
    }
}

async fn copy_documents(
    source: &Store,
    target: &Store,
    twin_id: &str,
    progress: &mut Progress,
) -> Result<(), String> {
    let names = source
        .documents
        .list(twin_id)
        .await
        .map_err(failed("listing documents"))?;
    for summary in names {
        copy_revisions(source, target, twin_id, &summary.document_name).await?;
        progress.done.documents += 1;
    }
    Ok(())
}

/// Copies a document with the revisions the source keeps, oldest first, each as it was
/// written (time, operation, writer), going on after the version the target has.
async fn copy_revisions(
    source: &Store,
    target: &Store,
    twin_id: &str,
    name: &str,
) -> Result<(), String> {
    let kept = source
        .documents
        .versions(
            twin_id,
            name,
            crate::domain::PageRequest {
                offset: 0,
                limit: u64::MAX,
            },
        )
        .await
        .map_err(failed("listing a document's revisions"))?;
    let mut versions = kept.items;
    versions.sort_by_key(|v| v.version);
    let Some(current) = source
        .documents
        .get(twin_id, name)
        .await
        .map_err(failed("reading a document"))?
    else {
        return Ok(());
    };
    let there = target
        .documents
        .get(twin_id, name)
        .await
        .map_err(failed("reading a document of the target"))?;
    if there.as_ref() == Some(&current) {
        return Ok(());
    }
    let mut expected = there.as_ref().map(|d| d.version);
    // A target that has no version of this history (written by something else) gets
    // the current version only, on top of what it has.
    let from = match &there {
        Some(d) if versions.iter().any(|v| v.version == d.version) => d.version,
        Some(_) => current.version - 1,
        None => 0,
    };
    for v in versions.iter().filter(|v| v.version > from) {
        let doc = source
            .documents
            .revision(twin_id, name, v.version)
            .await
            .map_err(failed("reading a revision"))?
            .ok_or(format!(
                "revision {} of document {name} of twin {twin_id} is gone (is the source being written to?)",
                v.version
            ))?;
        let write = DocumentWrite {
            doc: &doc,
            expected,
            op: v.op,
            by: &v.by,
            keep: u32::MAX,
            events: &[],
        };
        target
            .documents
            .write(&write)
            .await
            .map_err(failed("writing a document"))?;
        expected = Some(v.version);
    }
    Ok(())
}

/// A line on stderr at most every second.
struct Progress {
    total: Counts,
    done: Counts,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn tick(&mut self) {
        if self.last.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        eprintln!(
            "twins migrate: twins {}/{}, states {}/{} ({:.0}/s), documents {}/{}",
            self.done.twins,
            self.total.twins,
            self.done.states,
            self.total.states,
            self.done.states as f64 / secs,
            self.done.documents,
            self.total.documents
        );
    }
}
