//! Small previews of images for the console, and a difference hash to tell near-duplicates
//! apart.

use image::{DynamicImage, imageops::FilterType};

use super::{DecodeLimits, ImageInputError, decode_bytes};

/// The longest side of a thumbnail, in pixels.
pub const THUMBNAIL_SIDE: u32 = 160;

/// A JPEG preview of `bytes` no larger than [`THUMBNAIL_SIDE`] on either side (smaller images
/// keep their size), and the image's difference hash.
pub fn thumbnail(name: &str, bytes: &[u8], limits: &DecodeLimits) -> Result<(Vec<u8>, u64), ImageInputError> {
    let image = decode_bytes(name, bytes, limits)?;
    let hash = dhash(&image);
    let small = if image.width() > THUMBNAIL_SIDE || image.height() > THUMBNAIL_SIDE {
        image.resize(THUMBNAIL_SIDE, THUMBNAIL_SIDE, FilterType::Triangle)
    } else {
        image
    };
    let mut out = Vec::new();
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85);
    DynamicImage::ImageRgb8(small.to_rgb8()).write_with_encoder(encoder).map_err(|e| ImageInputError::Decode {
        file: name.to_string(),
        format: "a preview".into(),
        problem: e.to_string(),
    })?;
    Ok((out, hash))
}

/// The 64-bit difference hash: a 9x8 grey version, one bit per horizontal neighbour pair.
/// Near-duplicates (the same scene a moment later, a re-encoded copy) differ in a few bits.
pub fn dhash(image: &DynamicImage) -> u64 {
    let grey = image.resize_exact(9, 8, FilterType::Triangle).to_luma8();
    let mut hash = 0u64;
    for y in 0..8 {
        for x in 0..8 {
            let brighter = grey.get_pixel(x, y)[0] > grey.get_pixel(x + 1, y)[0];
            hash = (hash << 1) | brighter as u64;
        }
    }
    hash
}

/// Bits in which two hashes differ.
pub fn distance(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma};

    fn png(image: &GrayImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn gradient(width: u32, height: u32, shift: u8) -> GrayImage {
        GrayImage::from_fn(width, height, |x, y| Luma([((x * 7 + y * 3) as u8).wrapping_add(shift)]))
    }

    #[test]
    fn a_large_image_gets_a_small_jpeg_preview() {
        let (preview, _) = thumbnail("big.png", &png(&gradient(640, 320, 0)), &DecodeLimits::default()).unwrap();
        let decoded = image::load_from_memory(&preview).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (160, 80));
        let (preview, _) = thumbnail("small.png", &png(&gradient(32, 20, 0)), &DecodeLimits::default()).unwrap();
        let decoded = image::load_from_memory(&preview).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (32, 20), "small images keep their size");
    }

    #[test]
    fn near_duplicates_hash_close_and_different_images_far() {
        let a = DynamicImage::ImageLuma8(gradient(96, 96, 0));
        let brighter = DynamicImage::ImageLuma8(GrayImage::from_fn(96, 96, |x, y| {
            Luma([gradient(96, 96, 0).get_pixel(x, y)[0].saturating_add(3)])
        }));
        let mirrored = DynamicImage::ImageLuma8(image::imageops::flip_horizontal(&gradient(96, 96, 0)));
        assert!(distance(dhash(&a), dhash(&brighter)) <= 4);
        assert!(distance(dhash(&a), dhash(&mirrored)) > 16);
    }

    #[test]
    fn a_broken_image_is_an_error_naming_it() {
        let error = thumbnail("broken.jpg", b"not an image", &DecodeLimits::default()).unwrap_err();
        assert!(error.to_string().contains("broken.jpg"), "{error}");
    }
}
