//! `edgeadapt bench`: the adaptation benchmark table, JSON and plot.

use std::path::PathBuf;

use clap::Args;

use crate::adapt::method::Hyper;
use crate::bench::{self, BenchOptions, Progress, seen::SeenSpec};
use crate::config::DeviceConfig;
use crate::inference::Classifier;
use crate::output::{self, Overwrite};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Bundle folder (default: the config's bundle, else models/efficientnet-lite0-fonts36).
    #[arg(long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// Image-folder root with target/adapt and target/test (optionally target/unlabelled).
    #[arg(long, default_value = "target/data/fonts36", value_name = "ROOT")]
    pub data: PathBuf,
    /// Seen classes: names (`0,2,4`) or `count:K,seed:S`.
    #[arg(long, default_value = "count:18,seed:0", value_name = "SPEC")]
    pub seen: SeenSpec,
    /// Comma-separated methods, e.g. `source,ft-head,ft-tail+alg,recommended,oracle`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "source,ft-head,ft-head+alg,ft-tail,ft-tail+alg,adapter+alg,recommended,oracle"
    )]
    pub methods: Vec<String>,
    /// Training seeds per method.
    #[arg(long, default_value_t = 3)]
    pub seeds: usize,
    /// Write the results as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write a PNG plot.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Replace the files at `--json` and `--plot`.
    #[arg(long)]
    pub force: bool,
    /// Training steps (default 300).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Training steps of each learning rate `recommended` scores (default: as --steps).
    #[arg(long)]
    pub selection_steps: Option<usize>,
    /// Base learning rate for every method, overriding the defaults (rates are divided by each
    /// layer's mean squared input norm).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Resample the unlabelled traffic so that this share of it is unseen classes (e.g. 0.05,
    /// 0.2, 0.5, 0.8); adds the row `recommended@true-share` to `--methods` to see what the
    /// share estimate costs.
    #[arg(long, value_name = "SHARE")]
    pub traffic_unseen_share: Option<f32>,
    /// Where split tensors are cached (default: the edgeadapt cache).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Instead of comparing methods: label N images of the `--seen` classes' traffic in arrival
    /// order and in the console's "label next" order, adapt with `recommended` on each, and
    /// compare (docs/console.md).
    #[arg(long, value_name = "N")]
    pub label_budget: Option<usize>,
    /// With `--label-budget`: labels a class needs to take part in a run.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub min_samples: usize,
    /// With `--label-budget`: how uneven the site's traffic is; its k-th class keeps
    /// 1/(k+1)^S of its images (0: all).
    #[arg(long, default_value_t = 0.0, value_name = "S")]
    pub traffic_skew: f64,
    /// Deal the `--seen` classes to N simulated devices, adapt each, and compare each alone, the
    /// average of their versions (recalibrated) and one device with all their labels.
    #[arg(long, value_name = "N")]
    pub merge_devices: Option<usize>,
    /// With `--merge-devices`: each class is labelled on two devices instead of one.
    #[arg(long)]
    pub merge_overlap: bool,
}

pub fn run(args: BenchArgs, config: Option<&DeviceConfig>) -> anyhow::Result<i32> {
    let (bundle_dir, runtime) = super::bundle_and_runtime(args.bundle, config);
    let overwrite = Overwrite::from_force(args.force);
    // Checked before the work: a long run should not end in a refusal.
    for path in args.json.iter().chain(&args.plot) {
        output::check_file(path, overwrite)?;
    }
    if let (Some(json), Some(plot)) = (&args.json, &args.plot) {
        anyhow::ensure!(
            output::absolute(json)? != output::absolute(plot)?,
            "--json and --plot name the same file ({})",
            json.display()
        );
    }
    let bundle = super::load_bundle(&bundle_dir)?;
    let mut classifier = Classifier::open(bundle, &runtime)?;
    let mut hyper = Hyper::default();
    if let Some(steps) = args.steps {
        hyper.steps = steps;
        hyper.selection_steps = steps;
    }
    if let Some(steps) = args.selection_steps {
        hyper.selection_steps = steps;
    }
    if let Some(lr) = args.lr {
        hyper.learning_rate = Some(lr);
    }
    for name in &args.methods {
        if name != "oracle" && name != bench::TRUE_SHARE && name != bench::BALANCED {
            name.parse::<crate::adapt::method::Method>().map_err(anyhow::Error::msg)?;
        }
    }
    let options = BenchOptions {
        data: args.data,
        seen: args.seen,
        methods: args.methods,
        seeds: args.seeds.max(1),
        hyper,
        cache_dir: args.cache.unwrap_or_else(|| crate::runtime::library::cache_dir().join("splits")),
        traffic_unseen_share: args.traffic_unseen_share,
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:40} {bar:40} {pos}/{len} [{elapsed_precise}]")
            .expect("static template"),
    );
    let mut show = |event: Progress<'_>| match event {
        Progress::Extracting { what, done, total } => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(format!("extracting {what}"));
        }
        Progress::Adapting { method, seed, step, steps } => {
            bar.set_length(steps as u64);
            bar.set_position(step as u64);
            bar.set_message(format!("{method} (seed {seed})"));
        }
    };
    if let Some(devices) = args.merge_devices {
        let report = bench::merge::run(&mut classifier, &options, devices, args.merge_overlap, &mut show)?;
        bar.finish_and_clear();
        return print_report(&bench::merge::table(&report), &report, args.json.as_deref(), overwrite);
    }
    if let Some(budget) = args.label_budget {
        anyhow::ensure!(
            args.traffic_skew.is_finite() && args.traffic_skew >= 0.0,
            "--traffic-skew must be a number ≥ 0, not {}",
            args.traffic_skew
        );
        let setup =
            bench::labelling::LabellingSetup { budget, min_samples: args.min_samples.max(1), skew: args.traffic_skew };
        let report = bench::labelling::run(&mut classifier, &options, setup, &mut show)?;
        bar.finish_and_clear();
        return print_report(&bench::labelling::table(&report), &report, args.json.as_deref(), overwrite);
    }
    let report = bench::run(&mut classifier, &options, &mut show)?;
    bar.finish_and_clear();
    println!(
        "seen classes ({}): {}\nunseen classes ({}): {}\nadaptation samples: {} (seen classes of target/adapt); test samples: {}; label-free indicators use {}\n",
        report.seen_classes.len(),
        report.seen_classes.join(","),
        report.unseen_classes.len(),
        report.unseen_classes.join(","),
        report.adapt_samples,
        report.test_samples,
        report.unlabelled_source
    );
    println!("{}\n", bench::traffic_table(&report));
    println!("{}\n", bench::table(&report));
    let correlations: Vec<String> = report
        .indicator_rank_correlation
        .iter()
        .map(|(k, v)| format!("{k}: {}", v.map_or("-".into(), |v| format!("{v:.2}"))))
        .collect();
    println!("rank correlation of each indicator's change with the true unseen accuracy: {}", correlations.join(", "));
    if let Some(path) = &args.json {
        output::write_file(path, serde_json::to_string_pretty(&report)?.as_bytes(), overwrite)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        output::write_file_with(path, overwrite, |temporary| bench::plot::write(&report, "recommended", temporary))?;
        println!("wrote {}", path.display());
    }
    Ok(0)
}

/// Prints a report's table and, with `--json`, writes the report there.
fn print_report(
    table: &str,
    report: &impl serde::Serialize,
    json: Option<&std::path::Path>,
    overwrite: output::Overwrite,
) -> anyhow::Result<i32> {
    println!("{table}");
    if let Some(path) = json {
        output::write_file(path, serde_json::to_string_pretty(report)?.as_bytes(), overwrite)?;
        println!("wrote {}", path.display());
    }
    Ok(0)
}
