//! Processing accepted uploads: every gateway consumes `image:jobs` (group `gateway-workers`)
//! with `follow-bus`'s consumer, so a job runs on whichever gateway is free and is taken over from
//! one that died. For each job, idempotently:
//!
//! 1. a result record already in S3 (a previous attempt got that far) is handed off as it is;
//! 2. otherwise the original is read and run through the pipeline (stages reported live);
//! 3. outputs, then the result record are written, each once (a record already there wins and
//!    is what is handed off); the original is deleted (the record now stands for it) unless
//!    `FOLLOW_KEEP_ORIGINALS`;
//! 4. the hand-off: `XADD image:result` + `XACK image:jobs` in one `MULTI`.
//!
//! Storage or Valkey unavailable: the job stays pending (retried with backoff, its lease kept),
//! never failed. A bad image ends as a `failed` result. A pipeline failure is retried; after
//! `FOLLOW_JOB_MAX_FAILURES` it ends as a `failed` (`INTERNAL`) result and in `image:jobs:dead`.

use std::{sync::Arc, time::Instant};

use follow_bus::{
    Delivery, ErrorCode, Failure, Handler, ImageResult, Job, Outcome, OutputFile, Processed,
    ProgressTracker, ResultOutcome, Stage,
};
use follow_service::{
    objects::{self, Record, original_key, output_key, parse_storage_key, preview_key},
    s3::{Bucket, S3Error},
};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use tracing::Instrument as _;

use crate::{
    config::{JobConfig, PipelineConfig},
    metrics::Metrics,
    pipeline::{self, Encoded, PipelineError, Rendition},
    report::Reporter,
    sniff::Format,
};

/// A pipeline worker's handler of jobs (one job at a time: its consumer reads batches of one).
#[derive(Debug, Clone)]
pub struct JobHandler {
    pub bucket: Bucket,
    pub progress: ProgressTracker,
    pub metrics: Arc<Metrics>,
    pub pipeline: PipelineConfig,
    pub jobs: JobConfig,
    /// The largest original there can be.
    pub max_bytes: u64,
    /// One permit per job processed at a time (`FOLLOW_PIPELINE_WORKERS`), shared by the
    /// consumers of every partition: a job waits here, its lease renewed, until one is free.
    pub slots: Arc<tokio::sync::Semaphore>,
}

impl Handler<Job> for JobHandler {
    async fn handle(&mut self, batch: &[Delivery<Job>]) -> Vec<Outcome> {
        let Ok(_slot) = Arc::clone(&self.slots).acquire_owned().await else {
            return vec![Outcome::Retry; batch.len()];
        };
        let mut outcomes = Vec::with_capacity(batch.len());
        for delivery in batch {
            let span = tracing::info_span!("job", image_id = %delivery.message.image_id, entry = %delivery.id);
            self.metrics.processing.inc();
            let outcome = Box::pin(self.process(delivery).instrument(span)).await;
            self.metrics.processing.dec();
            outcomes.push(outcome);
        }
        outcomes
    }
}

/// How a job's processing ended, before it becomes an [`Outcome`].
enum Ended {
    Result(Box<ImageResult>),
    /// Storage (or the pool) is unavailable: try again later.
    Unavailable(String),
    /// The pipeline itself failed: counted, retried, given up on in the end.
    Failed(String),
}

impl JobHandler {
    async fn process(&self, delivery: &Delivery<Job>) -> Outcome {
        let job = &delivery.message;
        if parse_storage_key(&job.storage_key).map(|(_, image)| image) != Some(job.image_id) {
            return Outcome::dead_letter("the job's storage_key is not its image's");
        }
        match objects::read_record(&self.bucket, &job.storage_key).await {
            Ok(Record::Found(result)) => {
                // A previous attempt finished; only the hand-off (and the clean-up) is left.
                tracing::info!("result already recorded; handing it off");
                self.drop_original(job).await;
                return Outcome::HandOff(*result);
            }
            Ok(Record::Corrupt(reason)) => return Outcome::dead_letter(reason),
            Ok(Record::Missing) => {}
            Err(e) => return self.unavailable(&e.to_string()),
        }
        follow_service::failpoint("gateway-job-start");
        let started = Instant::now();
        let reporter = Reporter::start(&self.progress, &self.metrics, job.image_id);
        let ended = Box::pin(self.run(job, &reporter, started)).await;
        let outcome = match ended {
            Ended::Result(result) => match self.finish(job, *result).await {
                Ok(result) => {
                    match &result.outcome {
                        ResultOutcome::Processed(_) => {
                            reporter.stage(Stage::Done);
                            self.metrics.processed();
                        }
                        ResultOutcome::Failed(failure) => {
                            reporter.failed(failure.clone());
                            self.metrics.failed(failure.code);
                        }
                    }
                    Outcome::HandOff(result)
                }
                Err(outcome) => outcome,
            },
            Ended::Unavailable(reason) => self.unavailable(&reason),
            Ended::Failed(reason) if delivery.failures + 1 >= self.jobs.max_failures => {
                // The last try: the image fails for good, and the job is kept for operators.
                let failure = Failure {
                    code: ErrorCode::Internal,
                    message: "the image could not be processed".into(),
                };
                let result = match self
                    .record(job, failed(job, failure.clone(), started))
                    .await
                {
                    Ok(result) => result,
                    Err(outcome) => return outcome,
                };
                reporter.failed(failure);
                self.metrics.failed(ErrorCode::Internal);
                Outcome::DeadLetter {
                    reason: format!("failed {} times; last: {reason}", delivery.failures + 1),
                    hand_off: Some(result),
                }
            }
            Ended::Failed(reason) => Outcome::Fail(reason),
        };
        reporter.finish().await;
        outcome
    }

    /// Reads the original and runs the pipeline; stores the outputs of a processed image.
    async fn run(&self, job: &Job, reporter: &Reporter, started: Instant) -> Ended {
        let original = match self
            .bucket
            .get(&original_key(&job.storage_key), self.max_bytes)
            .await
        {
            Ok(bytes) => bytes,
            Err(S3Error::NotFound) => {
                // Neither a record nor an original: nothing can be made of this job.
                return Ended::Result(Box::new(failed(
                    job,
                    Failure {
                        code: ErrorCode::Internal,
                        message: "the uploaded image was lost".into(),
                    },
                    started,
                )));
            }
            Err(e) => return Ended::Unavailable(e.to_string()),
        };
        let Some(format) = Format::of_content_type(&job.content_type) else {
            return Ended::Result(Box::new(failed(
                job,
                Failure {
                    code: ErrorCode::InvalidImage,
                    message: "the content type is not accepted".into(),
                },
                started,
            )));
        };
        // Taken as the bytes arrived (and S3 checked them against it) when the gateway queued
        // the job; from the original when the reconciler did.
        let sha256 = job
            .sha256
            .clone()
            .unwrap_or_else(|| hex::encode(Sha256::digest(&original)));
        let output = self.pipeline_of(original, format, reporter).await;
        let output = match output {
            Ok(output) => output,
            Err(PipelineError::Internal) => {
                return Ended::Failed("the pipeline failed (see the logs)".into());
            }
            Err(e) => {
                let failure = Failure {
                    code: e.code(),
                    message: e.to_string(),
                };
                return Ended::Result(Box::new(failed(job, failure, started)));
            }
        };
        follow_service::failpoint("gateway-mid-pipeline");
        reporter.stage(Stage::UploadingToStorage);
        let (processed, objects) = match described(job, sha256, output) {
            Ok(described) => described,
            Err(message) => return Ended::Failed(message),
        };
        if let Err(e) = Box::pin(self.store_outputs(objects)).await {
            return Ended::Unavailable(e.to_string());
        }
        Ended::Result(Box::new(ImageResult {
            image_id: job.image_id,
            outcome: ResultOutcome::Processed(processed),
            produced_at: OffsetDateTime::now_utc(),
            processing_ms: started.elapsed().as_millis() as u64,
        }))
    }

    /// Every file of the image, each written once and all at once: an earlier attempt at this
    /// job that stored one made the same bytes from the same original, so finding it there is
    /// success.
    async fn store_outputs(&self, objects: Vec<(String, Encoded)>) -> Result<(), S3Error> {
        let writes = objects.into_iter().map(|(key, encoded)| async move {
            match self
                .bucket
                .put_new(&key, encoded.bytes, encoded.content_type)
                .await
            {
                Ok(()) | Err(S3Error::Exists) => Ok(()),
                Err(e) => Err(e),
            }
        });
        futures_util::future::try_join_all(writes).await?;
        Ok(())
    }

    /// The CPU part, on the blocking pool.
    async fn pipeline_of(
        &self,
        original: Vec<u8>,
        format: Format,
        reporter: &Reporter,
    ) -> Result<pipeline::Output, PipelineError> {
        let (config, stages) = (self.pipeline, reporter.sender());
        tokio::task::spawn_blocking(move || {
            pipeline::run(&original, format, &config, |stage| stages.stage(stage))
        })
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "the pipeline panicked");
            Err(PipelineError::Internal)
        })
    }

    /// The record, then the original's removal (the record stands for it from now on); the
    /// result to hand off is the one recorded.
    async fn finish(&self, job: &Job, result: ImageResult) -> Result<ImageResult, Outcome> {
        let result = self.record(job, result).await?;
        self.drop_original(job).await;
        follow_service::failpoint("gateway-before-handoff");
        Ok(result)
    }

    /// Records `result` unless the image has a record already: a record is never replaced, and
    /// the one there is the image's outcome.
    async fn record(&self, job: &Job, result: ImageResult) -> Result<ImageResult, Outcome> {
        match objects::write_record(&self.bucket, &job.storage_key, &result).await {
            Ok(()) => Ok(result),
            Err(S3Error::Exists) => {
                match objects::read_record(&self.bucket, &job.storage_key).await {
                    Ok(Record::Found(recorded)) => {
                        tracing::info!(
                            "another attempt recorded this image's result first; handing that off"
                        );
                        Ok(*recorded)
                    }
                    Ok(Record::Corrupt(reason)) => Err(Outcome::dead_letter(reason)),
                    Ok(Record::Missing) => {
                        Err(self.unavailable("the record vanished after a conflict"))
                    }
                    Err(e) => Err(self.unavailable(&e.to_string())),
                }
            }
            Err(e) => Err(self.unavailable(&e.to_string())),
        }
    }

    async fn drop_original(&self, job: &Job) {
        if self.jobs.keep_originals {
            return;
        }
        if let Err(e) = self.bucket.delete(&original_key(&job.storage_key)).await {
            // Harmless but wasteful: the record makes any later attempt a plain hand-off.
            tracing::warn!(error = %e, "the original could not be deleted");
        }
    }

    fn unavailable(&self, reason: &str) -> Outcome {
        tracing::warn!(reason, "storage unavailable; the job waits");
        Outcome::Retry
    }
}

fn failed(job: &Job, failure: Failure, started: Instant) -> ImageResult {
    ImageResult {
        image_id: job.image_id,
        outcome: ResultOutcome::Failed(failure),
        produced_at: OffsetDateTime::now_utc(),
        processing_ms: started.elapsed().as_millis() as u64,
    }
}

/// What the pipeline made of `job`, as its result describes it, and the objects to store it in.
fn described(
    job: &Job,
    sha256: String,
    output: pipeline::Output,
) -> Result<(Processed, Vec<(String, Encoded)>), String> {
    let files: Vec<OutputFile> = output
        .files
        .iter()
        .map(|f| OutputFile {
            role: f.role,
            content_type: f.encoded.content_type.to_owned(),
            width: f.encoded.width,
            height: f.encoded.height,
            byte_size: f.encoded.bytes.len() as u64,
        })
        .collect();
    let main = output.main();
    let processed = Processed {
        storage_key: job.storage_key.clone(),
        preview_key: preview_key(&job.storage_key),
        sha256,
        content_type: main.content_type.to_owned(),
        width: output.width,
        height: output.height,
        processed_width: main.width,
        processed_height: main.height,
        byte_size: main.bytes.len() as u64,
        thumbhash: output.thumbhash,
        stripped_metadata: output.stripped_metadata,
        files,
    };
    let mut objects = Vec::with_capacity(output.files.len());
    for Rendition { role, encoded } in output.files {
        let Some(key) = output_key(&job.storage_key, role, encoded.content_type) else {
            return Err(format!("no object name for {}", encoded.content_type));
        };
        objects.push((key, encoded));
    }
    Ok((processed, objects))
}
