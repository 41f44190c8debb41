//! `edgeadapt classify`: predictions for image files and folders.

use std::path::PathBuf;

use clap::Args;

use super::table::Table;
use crate::config::DeviceConfig;
use crate::imaging::DecodeLimits;
use crate::inference::{Classifier, collect_image_files};

#[derive(Debug, Args)]
pub struct ClassifyArgs {
    /// Bundle folder (default: the config's bundle, else models/efficientnet-lite0-fonts36).
    #[arg(long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Number of most probable classes to show.
    #[arg(long, default_value_t = 1, value_name = "K")]
    pub top: usize,
    /// Images per inference batch.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub batch: usize,
    /// Image files or folders (searched recursively for .png, .jpg, .jpeg).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

pub fn run(args: ClassifyArgs, config: Option<&DeviceConfig>) -> anyhow::Result<i32> {
    let (bundle_dir, runtime) = super::bundle_and_runtime(args.bundle, config);
    let bundle = super::load_bundle(&bundle_dir)?;
    let spinner = indicatif::ProgressBar::new_spinner();
    if args.json {
        spinner.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let tick = |elapsed: std::time::Duration| {
        spinner.set_message(format!(
            "opening the model: {} s (a first TensorRT engine build can take minutes)",
            elapsed.as_secs()
        ));
        spinner.tick();
    };
    let (mut classifier, _) = Classifier::open_warm(bundle, &runtime, &tick)?;
    spinner.finish_and_clear();
    let files = collect_image_files(&args.paths)?;
    if files.is_empty() {
        anyhow::bail!("no image files (.png, .jpg, .jpeg) under {:?}", args.paths);
    }
    let top = args.top.clamp(1, classifier.bundle.head.num_classes());
    let bar = super::progress_bar(files.len(), "classifying");
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let results =
        classifier.classify_files(&files, args.batch, top, &DecodeLimits::default(), |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    let failures = results.iter().filter(|r| r.outcome.is_err()).count();
    if args.json {
        for result in &results {
            println!("{}", serde_json::to_string(result)?);
        }
    } else {
        let mut table = Table::new(&["file", "class", "confidence", "top"]);
        for result in &results {
            let file = result.file.display().to_string();
            match &result.outcome {
                Ok(p) => table.row(vec![
                    file,
                    p.class.clone(),
                    format!("{:.3}", p.confidence),
                    p.top.iter().map(|(c, q)| format!("{c} {q:.3}")).collect::<Vec<_>>().join(", "),
                ]),
                Err(error) => {
                    // The file is in its own column.
                    let problem = error.strip_prefix(&format!("{file}: ")).unwrap_or(error).to_string();
                    table.row(vec![file, "ERROR".into(), String::new(), problem])
                }
            }
        }
        println!("{}", table.render());
        let tail = classifier.tail_provider().map_or("in Rust".to_string(), |p| format!("on {p}"));
        eprintln!(
            "{} images, {} failed; provider {}, tail and head {tail}",
            results.len(),
            failures,
            classifier.provider()
        );
    }
    Ok(if failures > 0 { 2 } else { 0 })
}
