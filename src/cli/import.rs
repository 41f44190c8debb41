//! `edgeadapt import-onnx` and `edgeadapt export-onnx`.

use std::path::PathBuf;

use clap::Args;

use crate::config::DeviceConfig;
use crate::inference::import_check::import_onnx;
use crate::model::manifest::{ColorMode, ResizePolicy};
use crate::model::onnx::import::ImportOptions;
use crate::model::onnx::{decode_model, encode_model, export};
use crate::output::{self, Overwrite};

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The ONNX classifier to import.
    #[arg(value_name = "MODEL.onnx")]
    pub model: PathBuf,
    /// Feature tensor: the input of the final linear layer.
    #[arg(long, value_name = "TENSOR")]
    pub features: String,
    /// Tensor where the trainable tail starts (default: chosen automatically, the deepest one
    /// followed only by layers the tail supports; name the features for an empty tail).
    #[arg(long, value_name = "TENSOR")]
    pub split: Option<String>,
    /// Name of the final linear node, when several read the features.
    #[arg(long, value_name = "NODE")]
    pub head: Option<String>,
    /// Text file with one class name per line (default: 0..C-1).
    #[arg(long, value_name = "FILE")]
    pub classes: Option<PathBuf>,
    /// Output bundle folder; must not exist yet, or be empty.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace the bundle at `--out` (a folder that is not a bundle is never replaced).
    #[arg(long)]
    pub force: bool,
    /// Input size H or HxW, when the model does not declare it.
    #[arg(long, value_name = "H[xW]", value_parser = parse_size)]
    pub size: Option<(u32, u32)>,
    /// Input channels, 1 or 3.
    #[arg(long)]
    pub channels: Option<u32>,
    /// How pixels fill the channels: grayscale, rgb or bgr (default: grayscale for 1 channel, rgb for 3).
    #[arg(long, value_parser = parse_color)]
    pub color: Option<ColorMode>,
    /// Resize policy: stretch or center-crop.
    #[arg(long, default_value = "stretch", value_parser = parse_resize)]
    pub resize: ResizePolicy,
    /// Mean per channel (or one for all), applied after scaling pixels to [0, 1].
    #[arg(long, value_name = "M[,M,M]", value_delimiter = ',')]
    pub mean: Option<Vec<f32>>,
    /// Standard deviation per channel (or one for all).
    #[arg(long, value_name = "S[,S,S]", value_delimiter = ',')]
    pub std: Option<Vec<f32>>,
    /// Bundle name (default: the model file's stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Where the model comes from (recorded in the manifest's provenance).
    #[arg(long, value_name = "TEXT")]
    pub source: Option<String>,
    /// The model's licence (recorded in the manifest's provenance).
    #[arg(long, value_name = "TEXT")]
    pub licence: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Bundle folder (default: the config's bundle, else models/efficientnet-lite0-fonts36).
    #[arg(long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// Output ONNX file; the logits output is named `logits`.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace the file at `--out`.
    #[arg(long)]
    pub force: bool,
}

fn parse_size(text: &str) -> Result<(u32, u32), String> {
    let parse = |s: &str| s.trim().parse::<u32>().map_err(|_| format!("'{text}' is not H or HxW"));
    match text.split_once(['x', 'X']) {
        Some((h, w)) => Ok((parse(h)?, parse(w)?)),
        None => parse(text).map(|h| (h, h)),
    }
}

fn parse_color(text: &str) -> Result<ColorMode, String> {
    match text {
        "grayscale" | "gray" => Ok(ColorMode::Grayscale),
        "rgb" => Ok(ColorMode::Rgb),
        "bgr" => Ok(ColorMode::Bgr),
        _ => Err(format!("'{text}': expected grayscale, rgb or bgr")),
    }
}

fn parse_resize(text: &str) -> Result<ResizePolicy, String> {
    match text {
        "stretch" => Ok(ResizePolicy::Stretch),
        "center-crop" => Ok(ResizePolicy::CenterCrop),
        _ => Err(format!("'{text}': expected stretch or center-crop")),
    }
}

pub fn run_import(args: ImportArgs, config: Option<&DeviceConfig>) -> anyhow::Result<i32> {
    let mut options = ImportOptions::new(&args.model, &args.features, &args.out);
    options.overwrite = Overwrite::from_force(args.force);
    options.split = args.split;
    options.head = args.head;
    options.classes = args.classes;
    options.size = args.size;
    options.channels = args.channels;
    options.color = args.color;
    options.resize = args.resize;
    options.mean = args.mean;
    options.std = args.std;
    options.name = args.name;
    if args.source.is_some() || args.licence.is_some() {
        options.provenance = Some(crate::model::manifest::Provenance {
            source: args.source.unwrap_or_default(),
            licence: args.licence.unwrap_or_default(),
            notes: String::new(),
        });
    }
    options.runtime = config.map(|c| c.runtime.clone()).unwrap_or_default();
    let report = import_onnx(&options)?;
    println!("bundle      {}", report.bundle.display());
    println!(
        "input       '{}' {:?} {}x{}x{} {:?}",
        report.input.tensor,
        report.input.layout,
        report.input.channels,
        report.input.height,
        report.input.width,
        report.input.color
    );
    println!("split       '{}' {:?} per sample", report.split, report.split_shape);
    if let Some(reason) = &report.split_reason {
        println!("            chosen automatically: {reason} (--split overrides)");
    }
    println!("tail        {}", if report.tail.is_empty() { "(empty)".to_string() } else { report.tail.join(" -> ") });
    println!("head        {} -> {} classes", report.feature_dim, report.classes);
    println!("check       max |logit difference| vs the original model: {:.2e}", report.max_logit_diff);
    Ok(0)
}

pub fn run_export(args: ExportArgs, config: Option<&DeviceConfig>) -> anyhow::Result<i32> {
    let (bundle_dir, _) = super::bundle_and_runtime(args.bundle, config);
    let overwrite = Overwrite::from_force(args.force);
    output::check_file(&args.out, overwrite)?;
    let bundle = super::load_bundle(&bundle_dir)?;
    let trunk_bytes = std::fs::read(bundle.trunk_path())?;
    let trunk = decode_model(&trunk_bytes)?;
    let model = export::full_model(&trunk, &bundle.manifest.trunk.output, &bundle.tail, &bundle.head)
        .map_err(anyhow::Error::msg)?;
    output::write_file(&args.out, &encode_model(&model), overwrite)?;
    println!("wrote {} (input '{}', output '{}')", args.out.display(), bundle.manifest.input.tensor, export::LOGITS);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_lists_parse() {
        assert_eq!(parse_size("96").unwrap(), (96, 96));
        assert_eq!(parse_size("64x128").unwrap(), (64, 128));
        assert!(parse_size("big").is_err());
        assert_eq!(parse_color("bgr").unwrap(), ColorMode::Bgr);
        assert!(parse_resize("squash").is_err());
    }

    #[test]
    fn an_import_command_line_parses_into_typed_options() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from([
            "edgeadapt",
            "import-onnx",
            "m.onnx",
            "--features",
            "f",
            "--out",
            "o",
            "--size",
            "96",
            "--mean",
            "0.485,0.456,0.406",
            "--std",
            "0.25",
            "--color",
            "grayscale",
            "--resize",
            "center-crop",
        ])
        .unwrap();
        let crate::cli::Command::ImportOnnx(args) = cli.command else { panic!("wrong command") };
        assert_eq!(args.mean, Some(vec![0.485, 0.456, 0.406]));
        assert_eq!(args.std, Some(vec![0.25]));
        assert_eq!(args.size, Some((96, 96)));
        assert_eq!(args.resize, ResizePolicy::CenterCrop);
        assert!(
            crate::cli::Cli::try_parse_from([
                "edgeadapt",
                "import-onnx",
                "m.onnx",
                "--features",
                "f",
                "--out",
                "o",
                "--mean",
                "x"
            ])
            .is_err()
        );
    }
}
