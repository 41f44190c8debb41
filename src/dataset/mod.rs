//! Labelled image folders (`<root>/<class>/<file>`), as used by the benchmark data.

use std::path::{Path, PathBuf};

use crate::inference::is_image_name;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledImage {
    pub path: PathBuf,
    /// Index into the class list the folder was read against.
    pub label: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: class folder '{class}' is not one of the model's classes")]
    UnknownClass { path: PathBuf, class: String },
    #[error("{path}: no labelled images (expected <class>/<image> folders)")]
    Empty { path: PathBuf },
}

/// Reads `<root>/<class>/*.{png,jpg,jpeg}` in sorted order, labelling by position in `classes`.
pub fn read_image_folder(root: &Path, classes: &[String]) -> Result<Vec<LabelledImage>, DatasetError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DatasetError::Io { path, source }
    };
    let mut class_dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(io(root))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io(root))?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    class_dirs.sort();
    let mut images = Vec::new();
    for dir in class_dirs {
        let class = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let Some(label) = classes.iter().position(|c| *c == class) else {
            return Err(DatasetError::UnknownClass { path: dir, class });
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io(&dir))?
            .into_iter()
            .filter(|p| p.is_file() && is_image_name(p))
            .collect();
        files.sort_by_key(|p| natural_key(p));
        images.extend(files.into_iter().map(|path| LabelledImage { path, label }));
    }
    if images.is_empty() {
        return Err(DatasetError::Empty { path: root.to_path_buf() });
    }
    Ok(images)
}

/// Sorts `2.png` before `10.png`.
fn natural_key(path: &Path) -> (u64, String) {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    (stem.parse().unwrap_or(u64::MAX), stem)
}

/// Keeps at most `per_class` images of each class, in order.
pub fn limit_per_class(images: Vec<LabelledImage>, per_class: usize) -> Vec<LabelledImage> {
    let mut counts = std::collections::HashMap::new();
    images
        .into_iter()
        .filter(|image| {
            let count = counts.entry(image.label).or_insert(0usize);
            *count += 1;
            *count <= per_class
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_labelled_by_class_position_and_sorted_naturally() {
        let root = tempfile::tempdir().unwrap();
        for (class, files) in [("b", vec!["10.png", "2.png", "notes.txt"]), ("a", vec!["0.jpg"])] {
            std::fs::create_dir(root.path().join(class)).unwrap();
            for file in files {
                std::fs::write(root.path().join(class).join(file), b"x").unwrap();
            }
        }
        let classes = vec!["a".to_string(), "b".to_string()];
        let images = read_image_folder(root.path(), &classes).unwrap();
        let names: Vec<(String, usize)> =
            images.iter().map(|i| (i.path.file_name().unwrap().to_string_lossy().into_owned(), i.label)).collect();
        assert_eq!(names, vec![("0.jpg".into(), 0), ("2.png".into(), 1), ("10.png".into(), 1)]);
        assert_eq!(limit_per_class(images, 1).len(), 2);
    }

    #[test]
    fn an_unknown_class_folder_is_named() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("zebra")).unwrap();
        let error = read_image_folder(root.path(), &["a".to_string()]).unwrap_err();
        assert!(error.to_string().contains("'zebra'"), "{error}");
    }
}
