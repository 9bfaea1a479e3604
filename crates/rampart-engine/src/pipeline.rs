//! A loaded pipeline: its validated config, its event schema, and the detectors that passed the
//! sandbox and planning. Detectors that were refused are kept as problems; the rest run.

use std::path::{Path, PathBuf};

use rampart_core::{Decision, EventSchema, Problem};
use rampart_sql::{CompiledDetector, DetectorEngine};

use crate::config::PipelineConfig;
use crate::decide::DecisionMaker;
use crate::decode::{Decoder, EventBatch};

/// Errors that stop a pipeline from loading at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `pipeline.toml` is missing or invalid.
    #[error("{}", problems_text(.0))]
    Config(Vec<Problem>),
    /// The SQL engine could not start.
    #[error(transparent)]
    Engine(#[from] rampart_sql::Error),
}

fn problems_text(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A pipeline ready to decode and evaluate events.
pub struct Pipeline {
    /// The pipeline directory.
    pub dir: PathBuf,
    /// Its validated configuration.
    pub config: PipelineConfig,
    /// The `events` table schema.
    pub schema: EventSchema,
    /// Detectors that loaded, in file-name order.
    pub detectors: Vec<CompiledDetector>,
    /// Detectors that were refused, with file, line and reason.
    pub problems: Vec<Problem>,
    engine: DetectorEngine,
    decisions: DecisionMaker,
}

/// What one batch produced.
#[derive(Debug, Default)]
pub struct Evaluation {
    /// Decisions in input order (for one event, in detector order).
    pub decisions: Vec<Decision>,
    /// Detectors that failed on this batch at run time, with the error.
    pub errors: Vec<(String, String)>,
}

impl Pipeline {
    /// Loads `dir/pipeline.toml` and every `dir/detectors/*.sql`.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let config_path = dir.join("pipeline.toml");
        if !config_path.is_file() {
            return Err(LoadError::Config(vec![Problem::in_file(
                &config_path,
                "no pipeline.toml here: a pipeline is a directory with pipeline.toml and detectors/*.sql",
            )]));
        }
        let config = PipelineConfig::load(&config_path).map_err(LoadError::Config)?;
        let extras = config
            .mapping
            .extras
            .iter()
            .map(|(n, _, t)| (n.clone(), *t))
            .collect();
        let schema = EventSchema::new(extras);
        let engine = DetectorEngine::new(&schema)?;
        let mut detectors: Vec<CompiledDetector> = Vec::new();
        let mut problems = Vec::new();
        for path in detector_files(&dir.join("detectors"), &mut problems) {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(Problem::in_file(&path, format!("cannot read: {e}")));
                    continue;
                }
            };
            match engine.compile(&path, &text) {
                Ok(d) => match detectors.iter().find(|o| o.meta.id == d.meta.id) {
                    Some(other) => problems.push(Problem::at(
                        &path,
                        1,
                        format!(
                            "detector id `{}` is already used by {}",
                            d.meta.id,
                            other.path.display()
                        ),
                    )),
                    None => detectors.push(d),
                },
                Err(ps) => problems.extend(ps),
            }
        }
        let decisions = DecisionMaker::new(config.name.clone(), config.default_block_for);
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            schema,
            detectors,
            problems,
            engine,
            decisions,
        })
    }

    /// A decoder for this pipeline's inputs.
    pub fn decoder(&self) -> Decoder {
        Decoder::new(
            self.config.mapping.clone(),
            self.schema.clone(),
            self.config.format,
            self.config.max_record_bytes,
            self.config.batch_size,
        )
    }

    /// Runs every detector on one batch.
    pub fn evaluate(&self, events: &EventBatch) -> Evaluation {
        let mut out = Evaluation::default();
        let processed_at = rampart_core::time::now();
        let results = self.engine.run(&self.detectors, events.batch.clone());
        let mut decided = Vec::new();
        for (detector, result) in self.detectors.iter().zip(results) {
            match result {
                Ok(batches) => {
                    for b in &batches {
                        decided.extend(self.decisions.decide(detector, b, events, &processed_at));
                    }
                }
                Err(e) => out.errors.push((detector.meta.id.clone(), e.to_string())),
            }
        }
        // Input order, then detector order (the sort is stable).
        decided.sort_by_key(|(event, _)| *event);
        out.decisions = decided.into_iter().map(|(_, d)| d).collect();
        out
    }

    /// How many detector plans were built since load (one per loaded detector: plans are never
    /// rebuilt per batch).
    pub fn plans_built(&self) -> usize {
        self.engine.plans_built()
    }
}

fn detector_files(dir: &Path, problems: &mut Vec<Problem>) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(Problem::in_file(dir, format!("cannot list detectors: {e}")));
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::replay_collect;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// A copy of the cloudtrail pipeline with `batch_size` changed.
    fn with_batch_size(dir: &Path, batch_size: usize) -> PathBuf {
        let src = repo().join("pipelines/cloudtrail");
        let dst = dir.join(format!("cloudtrail-{batch_size}"));
        std::fs::create_dir_all(dst.join("detectors")).expect("mkdir");
        let toml = std::fs::read_to_string(src.join("pipeline.toml")).expect("read");
        std::fs::write(
            dst.join("pipeline.toml"),
            toml.replace("batch_size = 4096", &format!("batch_size = {batch_size}")),
        )
        .expect("write");
        for e in std::fs::read_dir(src.join("detectors")).expect("ls") {
            let p = e.expect("entry").path();
            std::fs::copy(&p, dst.join("detectors").join(p.file_name().expect("name"))).expect("copy");
        }
        dst
    }

    #[test]
    fn plans_are_built_once_per_detector_however_many_batches_run() {
        let tmp = tempfile::tempdir().expect("tmp");
        let logs = repo().join("data/cloudtrail/stratus-detonation-logs");
        let mut ids_by_batch_size = Vec::new();
        for batch_size in [4096, 7, 1] {
            let pipeline = Pipeline::load(&with_batch_size(tmp.path(), batch_size)).expect("loads");
            assert!(pipeline.problems.is_empty(), "{:?}", pipeline.problems);
            let (out, summary) = replay_collect(&pipeline, &[logs.as_path()]).expect("replays");
            assert_eq!(summary.events, 310);
            assert_eq!(
                pipeline.plans_built(),
                pipeline.detectors.len(),
                "no plan is built per batch"
            );
            let mut ids: Vec<String> = out.decisions.iter().map(|d| d.decision_id.clone()).collect();
            ids.sort();
            ids_by_batch_size.push(ids);
        }
        assert_eq!(ids_by_batch_size[0].len(), 23);
        assert_eq!(
            ids_by_batch_size[0], ids_by_batch_size[1],
            "batching does not change decisions"
        );
        assert_eq!(
            ids_by_batch_size[0], ids_by_batch_size[2],
            "batching does not change decisions"
        );
    }
}
