//! `edgeadapt demo`: the main job on the embedded default: the bundled model classifies the
//! bundled benchmark samples on the CPU, and the report shows how the domain shift hurts.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use super::table::Table;
use crate::config::DeviceConfig;
use crate::dataset::{limit_per_class, read_image_folder};
use crate::imaging::DecodeLimits;
use crate::inference::Classifier;
use crate::metrics::{accuracy, per_class_accuracy};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Benchmark data root with source/test and target/test (extracted from benches/data/fonts36.tar.gz).
    #[arg(long, default_value = "target/data/fonts36", value_name = "DIR")]
    pub data: PathBuf,
    /// Bundle folder (default: the config's bundle, else models/efficientnet-lite0-fonts36).
    #[arg(long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// Images per class and domain (0: all).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub per_class: usize,
    /// Only the accuracy report, without the on-site story (agent, labels, adaptation, fleet).
    #[arg(long)]
    pub no_story: bool,
}

struct DomainResult {
    name: &'static str,
    images: usize,
    failed: usize,
    accuracy: f64,
    per_class: Vec<Option<f64>>,
    images_per_second: f64,
    examples: Vec<[String; 4]>,
}

pub fn run(args: DemoArgs, config: Option<&DeviceConfig>) -> anyhow::Result<i32> {
    let (bundle_dir, runtime) = super::bundle_and_runtime(args.bundle, config);
    let bundle = super::load_bundle(&bundle_dir)?;
    let mut classifier = Classifier::open(bundle, &runtime)?;
    let classes = classifier.bundle.head.classes.clone();
    let rt = crate::runtime::init(runtime.ort_library.as_deref())?;
    println!("# edgeadapt demo\n");
    println!("bundle    {} ({})", classifier.bundle.manifest.name, bundle_dir.display());
    println!("runtime   ONNX Runtime {} from {} ({})", rt.version, rt.library.path.display(), rt.library.source);
    println!("provider  {}\n", classifier.provider());

    let mut domains = Vec::new();
    for (name, folder) in [("source (printed fonts)", "source/test"), ("target (handwriting)", "target/test")] {
        let root = args.data.join(folder);
        if !root.is_dir() {
            anyhow::bail!(
                "{} is missing: extract the benchmark data first (`tar -xzf benches/data/fonts36.tar.gz -C target/data`)",
                root.display()
            );
        }
        let mut images = read_image_folder(&root, &classes)?;
        if args.per_class > 0 {
            images = limit_per_class(images, args.per_class);
        }
        let files: Vec<PathBuf> = images.iter().map(|i| i.path.clone()).collect();
        let bar = super::progress_bar(files.len(), folder);
        let started = Instant::now();
        let results = classifier.classify_files(&files, 32, 1, &DecodeLimits::default(), |n| bar.inc(n as u64))?;
        let seconds = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let mut labels = Vec::new();
        let mut predicted = Vec::new();
        let mut examples = Vec::new();
        for (image, result) in images.iter().zip(&results) {
            if let Ok(prediction) = &result.outcome {
                labels.push(image.label);
                predicted.push(prediction.class_index);
                // The first mistake of each class, for up to six classes.
                let class_shown = examples.iter().any(|row: &[String; 4]| row[1] == classes[image.label]);
                if examples.len() < 6 && !class_shown && prediction.class_index != image.label {
                    examples.push([
                        image.path.strip_prefix(&args.data).unwrap_or(&image.path).display().to_string(),
                        classes[image.label].clone(),
                        prediction.class.clone(),
                        format!("{:.3}", prediction.confidence),
                    ]);
                }
            }
        }
        domains.push(DomainResult {
            name,
            images: results.len(),
            failed: results.len() - labels.len(),
            accuracy: accuracy(&labels, &predicted).unwrap_or(0.0),
            per_class: per_class_accuracy(&labels, &predicted, classes.len()),
            images_per_second: results.len() as f64 / seconds,
            examples,
        });
    }

    let mut summary = Table::new(&["domain", "images", "failed", "accuracy", "images/s (decode + inference)"]);
    for d in &domains {
        summary.row(vec![
            d.name.into(),
            d.images.to_string(),
            d.failed.to_string(),
            format!("{:.1}%", 100.0 * d.accuracy),
            format!("{:.0}", d.images_per_second),
        ]);
    }
    println!("## Accuracy (argmax over all {} classes)\n\n{}\n", classes.len(), summary.render());

    let mut per_class = Table::new(&["class", "source", "target", "change"]);
    let percent = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.0}%", 100.0 * v));
    for (index, class) in classes.iter().enumerate() {
        let (s, t) = (domains[0].per_class[index], domains[1].per_class[index]);
        let change = match (s, t) {
            (Some(s), Some(t)) => format!("{:+.0}", 100.0 * (t - s)),
            _ => "-".into(),
        };
        per_class.row(vec![class.clone(), percent(s), percent(t), change]);
    }
    println!("## Per-class accuracy\n\n{}\n", per_class.render());

    let mut examples = Table::new(&["file", "true", "predicted", "confidence"]);
    for row in &domains[1].examples {
        examples.row(row.to_vec());
    }
    println!("## Some target-domain mistakes\n\n{}\n", examples.render());
    println!(
        "The drop from source to target is the domain shift that on-device adaptation addresses: staff label a few classes on site and the model adapts without losing the others.\n"
    );
    if !args.no_story {
        super::story::run(&bundle_dir, &runtime, &args.data, &classes)?;
    }
    Ok(0)
}
