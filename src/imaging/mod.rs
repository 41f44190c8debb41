//! Turning image files into model input: decoding with limits, then the bundle's input contract.
//!
//! Every failure names the file, and one bad file never stops a batch.

use std::io::Cursor;
use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, ImageBuffer, ImageFormat, ImageReader, Pixel};
use ndarray::{Array3, Array4, ArrayView3, Axis};

use crate::model::manifest::{ColorMode, InputContract, Layout, ResizePolicy};

pub mod thumbnail;

/// Guards against decompression bombs and oversized inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    pub max_file_bytes: u64,
    pub max_width: u32,
    pub max_height: u32,
    /// Upper bound on decoder allocations, which includes the decoded pixels.
    pub max_alloc_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_file_bytes: 64 << 20, max_width: 12_000, max_height: 12_000, max_alloc_bytes: 512 << 20 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageInputError {
    #[error("{file}: cannot read: {source}")]
    Io { file: String, source: std::io::Error },
    #[error("{file}: empty file")]
    Empty { file: String },
    #[error("{file}: {bytes} bytes exceeds the {limit}-byte limit for an input image")]
    FileTooLarge { file: String, bytes: u64, limit: u64 },
    #[error("{file}: not a supported image (PNG or JPEG expected)")]
    UnknownFormat { file: String },
    #[error("{file}: image exceeds the decode limits ({problem}); refusing it as a possible decompression bomb")]
    TooLarge { file: String, problem: String },
    #[error("{file}: cannot decode {format}: {problem}")]
    Decode { file: String, format: String, problem: String },
}

impl ImageInputError {
    /// What is wrong, without the file name (for messages that name the file themselves).
    pub fn problem(&self) -> String {
        let full = self.to_string();
        let file = match self {
            ImageInputError::Io { file, .. }
            | ImageInputError::Empty { file }
            | ImageInputError::FileTooLarge { file, .. }
            | ImageInputError::UnknownFormat { file }
            | ImageInputError::TooLarge { file, .. }
            | ImageInputError::Decode { file, .. } => file,
        };
        full.strip_prefix(&format!("{file}: ")).map(str::to_string).unwrap_or(full)
    }
}

/// Reads and decodes one file.
pub fn decode_file(path: &Path, limits: &DecodeLimits) -> Result<DynamicImage, ImageInputError> {
    let file = path.display().to_string();
    let metadata = std::fs::metadata(path).map_err(|source| ImageInputError::Io { file: file.clone(), source })?;
    if metadata.len() > limits.max_file_bytes {
        return Err(ImageInputError::FileTooLarge { file, bytes: metadata.len(), limit: limits.max_file_bytes });
    }
    let bytes = std::fs::read(path).map_err(|source| ImageInputError::Io { file: file.clone(), source })?;
    decode_bytes(&file, &bytes, limits)
}

/// Decodes an in-memory image; `name` is used in messages.
pub fn decode_bytes(name: &str, bytes: &[u8], limits: &DecodeLimits) -> Result<DynamicImage, ImageInputError> {
    let file = name.to_string();
    if bytes.is_empty() {
        return Err(ImageInputError::Empty { file });
    }
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(ImageInputError::FileTooLarge { file, bytes: bytes.len() as u64, limit: limits.max_file_bytes });
    }
    let format = match image::guess_format(bytes) {
        Ok(format @ (ImageFormat::Png | ImageFormat::Jpeg)) => format,
        _ => return Err(ImageInputError::UnknownFormat { file }),
    };
    if format == ImageFormat::Jpeg {
        jpeg_within_limits(&file, bytes, limits)?;
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(limits.max_width);
    image_limits.max_image_height = Some(limits.max_height);
    image_limits.max_alloc = Some(limits.max_alloc_bytes);
    reader.limits(image_limits);
    reader.decode().map_err(|error| match error {
        image::ImageError::Limits(problem) => ImageInputError::TooLarge { file, problem: problem.to_string() },
        other => {
            ImageInputError::Decode { file, format: format!("{format:?}").to_uppercase(), problem: other.to_string() }
        }
    })
}

/// The JPEG decoder holds two bytes per sample of coefficients for a progressive image besides
/// the output, which the decoder's own limit does not count: allow for it from the header
/// alone, before anything is decoded.
fn jpeg_within_limits(file: &str, bytes: &[u8], limits: &DecodeLimits) -> Result<(), ImageInputError> {
    use image::ImageDecoder;
    let decode_error =
        |problem: String| ImageInputError::Decode { file: file.to_string(), format: "JPEG".into(), problem };
    let decoder = image::codecs::jpeg::JpegDecoder::new(Cursor::new(bytes)).map_err(|e| decode_error(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    let samples = u64::from(width) * u64::from(height) * u64::from(decoder.color_type().channel_count());
    let needed = samples.saturating_mul(3);
    if needed > limits.max_alloc_bytes {
        return Err(ImageInputError::TooLarge {
            file: file.to_string(),
            problem: format!(
                "{width}x{height} needs up to {needed} bytes to decode, over the {}-byte limit",
                limits.max_alloc_bytes
            ),
        });
    }
    Ok(())
}

/// Applies the input contract: colour mode, resize policy, scaling and normalisation.
///
/// Returns one sample in the contract's layout, `[C, H, W]` or `[H, W, C]`.
pub fn to_model_input(image: &DynamicImage, contract: &InputContract) -> Array3<f32> {
    let (height, width) = (contract.height as usize, contract.width as usize);
    let channels = contract.channels as usize;
    // Planes in model channel order, each height x width, as 0..=255 values.
    let planes: Vec<Vec<u8>> = match contract.color {
        ColorMode::Grayscale => {
            let luma = fit(image.to_luma8(), contract);
            vec![luma.into_raw(); channels]
        }
        ColorMode::Rgb | ColorMode::Bgr => {
            let rgb = fit(image.to_rgb8(), contract);
            let mut planes: Vec<Vec<u8>> = (0..3).map(|c| rgb.pixels().map(|p| p.channels()[c]).collect()).collect();
            if contract.color == ColorMode::Bgr {
                planes.reverse();
            }
            planes
        }
    };
    let mut chw = Array3::<f32>::zeros((channels, height, width));
    for (c, plane) in planes.iter().enumerate() {
        let (mean, std) = (contract.mean[c], contract.std[c]);
        for (value, &pixel) in chw.index_axis_mut(Axis(0), c).iter_mut().zip(plane) {
            *value = (pixel as f32 / 255.0 - mean) / std;
        }
    }
    match contract.layout {
        Layout::Nchw => chw,
        Layout::Nhwc => chw.permuted_axes([1, 2, 0]).as_standard_layout().into_owned(),
    }
}

/// Stacks samples into a batch `[N, ...]`.
pub fn stack(samples: &[ArrayView3<'_, f32>]) -> Array4<f32> {
    ndarray::stack(Axis(0), samples).expect("samples of one contract share a shape")
}

fn fit<P>(image: ImageBuffer<P, Vec<u8>>, contract: &InputContract) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let (target_w, target_h) = (contract.width, contract.height);
    let (w, h) = image.dimensions();
    if (w, h) == (target_w, target_h) {
        return image;
    }
    match contract.resize {
        ResizePolicy::Stretch => image::imageops::resize(&image, target_w, target_h, FilterType::Triangle),
        ResizePolicy::CenterCrop => {
            let scale = f64::max(target_w as f64 / w as f64, target_h as f64 / h as f64);
            let scaled_w = ((w as f64 * scale).round() as u32).max(target_w);
            let scaled_h = ((h as f64 * scale).round() as u32).max(target_h);
            let scaled = image::imageops::resize(&image, scaled_w, scaled_h, FilterType::Triangle);
            let (x, y) = ((scaled_w - target_w) / 2, (scaled_h - target_h) / 2);
            image::imageops::crop_imm(&scaled, x, y, target_w, target_h).to_image()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma, Rgb, RgbImage};

    fn contract(color: ColorMode, channels: u32, layout: Layout, resize: ResizePolicy) -> InputContract {
        InputContract {
            tensor: "image".into(),
            layout,
            height: 4,
            width: 4,
            channels,
            color,
            resize,
            mean: vec![0.5; channels as usize],
            std: vec![0.25; channels as usize],
        }
    }

    #[test]
    fn grayscale_is_replicated_and_normalised() {
        let image = DynamicImage::ImageLuma8(GrayImage::from_fn(4, 4, |x, y| Luma([(x * 60 + y) as u8])));
        let tensor = to_model_input(&image, &contract(ColorMode::Grayscale, 3, Layout::Nchw, ResizePolicy::Stretch));
        assert_eq!(tensor.dim(), (3, 4, 4));
        for c in 0..3 {
            let expected = ((3 * 60 + 2) as f32 / 255.0 - 0.5) / 0.25;
            assert_eq!(tensor[[c, 2, 3]], expected);
        }
    }

    #[test]
    fn rgb_bgr_and_nhwc_put_channels_where_the_contract_says() {
        let image = DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 4, Rgb([255, 0, 51])));
        let value = |v: u8| (v as f32 / 255.0 - 0.5) / 0.25;
        let rgb = to_model_input(&image, &contract(ColorMode::Rgb, 3, Layout::Nchw, ResizePolicy::Stretch));
        assert_eq!([rgb[[0, 1, 1]], rgb[[1, 1, 1]], rgb[[2, 1, 1]]], [value(255), value(0), value(51)]);
        let bgr = to_model_input(&image, &contract(ColorMode::Bgr, 3, Layout::Nchw, ResizePolicy::Stretch));
        assert_eq!(bgr[[0, 1, 1]], value(51));
        let nhwc = to_model_input(&image, &contract(ColorMode::Rgb, 3, Layout::Nhwc, ResizePolicy::Stretch));
        assert_eq!(nhwc.dim(), (4, 4, 3));
        assert_eq!(nhwc[[1, 1, 2]], value(51));
    }

    #[test]
    fn resizing_keeps_a_uniform_image_uniform_under_both_policies() {
        let image = DynamicImage::ImageLuma8(GrayImage::from_pixel(10, 6, Luma([200])));
        for resize in [ResizePolicy::Stretch, ResizePolicy::CenterCrop] {
            let tensor = to_model_input(&image, &contract(ColorMode::Grayscale, 1, Layout::Nchw, resize));
            assert_eq!(tensor.dim(), (1, 4, 4));
            let expected = (200.0 / 255.0 - 0.5) / 0.25;
            assert!(tensor.iter().all(|v| (v - expected).abs() < 1e-6), "{resize:?}");
        }
    }

    #[test]
    fn center_crop_keeps_the_middle() {
        // Left third black, middle white, right third black: the crop of a 12x4 image to 4x4 sees white.
        let image = DynamicImage::ImageLuma8(GrayImage::from_fn(12, 4, |x, _| {
            Luma([if (4..8).contains(&x) { 255 } else { 0 }])
        }));
        let tensor = to_model_input(&image, &contract(ColorMode::Grayscale, 1, Layout::Nchw, ResizePolicy::CenterCrop));
        let white = (1.0 - 0.5) / 0.25;
        assert!(tensor.iter().all(|v| (v - white).abs() < 1e-6));
    }

    #[test]
    fn bad_bytes_are_named_errors() {
        let limits = DecodeLimits::default();
        assert!(matches!(decode_bytes("e.png", b"", &limits), Err(ImageInputError::Empty { .. })));
        assert!(matches!(decode_bytes("t.png", b"hello world", &limits), Err(ImageInputError::UnknownFormat { .. })));
        let mut png = Vec::new();
        DynamicImage::ImageLuma8(GrayImage::from_pixel(64, 64, Luma([7])))
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        assert!(decode_bytes("ok.png", &png, &limits).is_ok());
        let truncated = &png[..png.len() / 2];
        let error = decode_bytes("cut.png", truncated, &limits).unwrap_err();
        assert!(matches!(error, ImageInputError::Decode { .. }), "{error}");
        assert!(error.to_string().starts_with("cut.png"));
        let tight = DecodeLimits { max_width: 32, ..limits };
        assert!(matches!(decode_bytes("big.png", &png, &tight), Err(ImageInputError::TooLarge { .. })));
    }
}
