//! `edgeadapt add-reference`: store source-domain reference samples in a bundle.

use std::path::PathBuf;

use clap::Args;

use crate::config::DeviceConfig;
use crate::dataset::{limit_per_class, read_image_folder};
use crate::imaging::{self, DecodeLimits};
use crate::inference::{Classifier, prepare_files};
use crate::model::reference::{concatenate, write_reference};

#[derive(Debug, Args)]
pub struct ReferenceArgs {
    /// Bundle folder to update (default: the config's bundle, else models/efficientnet-lite0-fonts36).
    #[arg(long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// Source-domain image folder (`<class>/<image>`), e.g. the source test split.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Samples kept per class (the first ones in file order).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub per_class: usize,
}

pub fn run(args: ReferenceArgs, config: Option<&DeviceConfig>) -> anyhow::Result<i32> {
    let (bundle_dir, runtime) = super::bundle_and_runtime(args.bundle, config);
    let bundle = super::load_bundle(&bundle_dir)?;
    let mut classifier = Classifier::open(bundle, &runtime)?;
    let images =
        limit_per_class(read_image_folder(&args.data, &classifier.bundle.head.classes)?, args.per_class.max(1));
    let bar = super::progress_bar(images.len(), "reference");
    let mut splits = Vec::new();
    let mut labels = Vec::new();
    for chunk in images.chunks(32) {
        let files: Vec<PathBuf> = chunk.iter().map(|i| i.path.clone()).collect();
        let prepared = prepare_files(&files, &classifier.bundle.manifest.input, &DecodeLimits::default());
        let mut views = Vec::new();
        for (image, outcome) in chunk.iter().zip(&prepared) {
            match outcome {
                Ok(tensor) => {
                    views.push(tensor.view());
                    labels.push(image.label);
                }
                Err(error) => anyhow::bail!("reference images must all decode: {error}"),
            }
        }
        splits.push(classifier.split(imaging::stack(&views).view())?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let split = concatenate(&splits);
    let description = format!("{} source-domain samples per class from {}", args.per_class, args.data.display());
    write_reference(&classifier.bundle, &split, &labels, &description)?;
    println!("stored {} reference samples ({} per class) in {}", labels.len(), args.per_class, bundle_dir.display());
    Ok(0)
}
