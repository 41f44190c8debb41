//! The folder poll's decisions, apart from the disk: which entries to take, how to batch them,
//! whether a failed file is tried again, and names that fit the file system.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Images classified together from the watched folder, and labelled together from the inbox:
/// at most this many files, and at most this many bytes of them in memory at once.
pub const FOLDER_BATCH: usize = 32;
pub const FOLDER_BATCH_BYTES: u64 = 64 << 20;
/// A file that fails while it is still being written is tried again until it has been left
/// alone this long.
pub const SETTLE: Duration = Duration::from_secs(2);

/// What an entry of the watched folder or of an inbox class folder is, without following links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Link,
    Other,
}

/// What to do with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Triage {
    /// A finished file: read it.
    Take,
    /// Still being written (hidden, `.tmp` or `.part` name), or not ours to touch: leave it.
    Leave,
    /// A link: move the link itself aside with a reason; its target is never read.
    RefuseLink,
}

/// Entries of the watched folder and of inbox class folders. Writers are expected to write
/// elsewhere (or under a hidden, `.tmp` or `.part` name) and rename into the folder.
pub fn triage(name: &str, kind: EntryKind) -> Triage {
    if name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part") {
        return Triage::Leave;
    }
    match kind {
        EntryKind::File => Triage::Take,
        EntryKind::Link => Triage::RefuseLink,
        EntryKind::Dir | EntryKind::Other => Triage::Leave,
    }
}

/// Splits files (with their sizes) into consecutive batches of at most `max_files` files and
/// `max_bytes` bytes; a file larger than `max_bytes` makes a batch of its own.
pub fn batches<T>(files: &[(T, u64)], max_files: usize, max_bytes: u64) -> Vec<&[(T, u64)]> {
    let mut batches = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (index, (_, size)) in files.iter().enumerate() {
        let count = index - start;
        if count > 0 && (count == max_files || bytes.saturating_add(*size) > max_bytes) {
            batches.push(&files[start..index]);
            start = index;
            bytes = 0;
        }
        bytes = bytes.saturating_add(*size);
    }
    if start < files.len() {
        batches.push(&files[start..]);
    }
    batches
}

/// Whether a file that failed is failed for good or tried again at the next poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    Again,
    GiveUp,
}

/// Remembers files that failed while they may still have been written to. A file is tried
/// again while it was modified less than [`SETTLE`] ago, and never for longer than [`SETTLE`]
/// after its first failure (a clock that puts the file in the future cannot keep it forever).
#[derive(Debug, Default)]
pub struct Settling {
    first_failed: HashMap<PathBuf, Instant>,
}

impl Settling {
    /// `modified_ago` is `None` when the file's time is in the future or unknown.
    pub fn on_failure(&mut self, file: &Path, modified_ago: Option<Duration>, now: Instant) -> Retry {
        let first = *self.first_failed.entry(file.to_path_buf()).or_insert(now);
        let fresh = modified_ago.is_none_or(|ago| ago < SETTLE);
        if fresh && now.duration_since(first) < SETTLE {
            Retry::Again
        } else {
            self.first_failed.remove(file);
            Retry::GiveUp
        }
    }

    /// The file is settled (taken, moved or failed for good).
    pub fn on_settled(&mut self, file: &Path) {
        self.first_failed.remove(file);
    }

    /// Forgets files that are gone, so the map stays as small as the folders.
    pub fn retain_present(&mut self, present: &HashSet<PathBuf>) {
        self.first_failed.retain(|path, _| present.contains(path));
    }
}

/// Longest file name most file systems take, in bytes.
const MAX_NAME_BYTES: usize = 255;

/// `prefix + name + suffix`, with the start of `name` cut (on a character boundary) so that the
/// whole stays within [`MAX_NAME_BYTES`].
pub fn fit_name(prefix: &str, name: &str, suffix: &str) -> String {
    let room = MAX_NAME_BYTES.saturating_sub(prefix.len() + suffix.len());
    let mut start = name.len().saturating_sub(room);
    while !name.is_char_boundary(start) {
        start += 1;
    }
    format!("{prefix}{}{suffix}", &name[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_files_are_taken_and_links_refused() {
        assert_eq!(triage("a.png", EntryKind::File), Triage::Take);
        assert_eq!(triage("a.png", EntryKind::Link), Triage::RefuseLink);
        assert_eq!(triage("sub", EntryKind::Dir), Triage::Leave);
        assert_eq!(triage("fifo", EntryKind::Other), Triage::Leave);
        for name in [".hidden.png", "a.png.tmp", "a.png.part"] {
            assert_eq!(triage(name, EntryKind::File), Triage::Leave, "{name}");
            assert_eq!(triage(name, EntryKind::Link), Triage::Leave, "{name}");
        }
    }

    #[test]
    fn a_file_being_written_is_retried_until_it_settles() {
        let mut settling = Settling::default();
        let file = Path::new("watch/a.png");
        let start = Instant::now();
        assert_eq!(settling.on_failure(file, Some(Duration::from_millis(10)), start), Retry::Again);
        assert_eq!(settling.on_failure(file, Some(Duration::from_millis(300)), start + SETTLE / 2), Retry::Again);
        // Unchanged for SETTLE: failed for good, and forgotten.
        assert_eq!(settling.on_failure(file, Some(SETTLE), start + SETTLE), Retry::GiveUp);
        assert!(settling.first_failed.is_empty());
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let files: Vec<(u8, u64)> = vec![(0, 10), (1, 10), (2, 10), (3, 100), (4, 1), (5, 1)];
        let sizes =
            |b: Vec<&[(u8, u64)]>| b.iter().map(|b| b.iter().map(|f| f.0).collect::<Vec<_>>()).collect::<Vec<_>>();
        assert_eq!(sizes(batches(&files, 2, 1000)), vec![vec![0, 1], vec![2, 3], vec![4, 5]]);
        // 25 bytes a batch: the 100-byte file goes alone.
        assert_eq!(sizes(batches(&files, 32, 25)), vec![vec![0, 1], vec![2], vec![3], vec![4, 5]]);
        assert!(batches::<u8>(&[], 32, 25).is_empty());
    }

    #[test]
    fn numbered_and_reason_names_stay_within_the_limit() {
        let long = format!("{}.png", "q".repeat(251));
        assert_eq!(fit_name("1-", &long, "").len(), MAX_NAME_BYTES);
        assert!(fit_name("1-", &long, "").ends_with(".png"));
        assert_eq!(fit_name("", &long, ".reason.txt").len(), MAX_NAME_BYTES);
        assert_eq!(fit_name("1-", "a.png", ""), "1-a.png");
        let accented = "é".repeat(200);
        assert!(fit_name("12-", &accented, "").len() <= MAX_NAME_BYTES);
    }

    #[test]
    fn an_old_broken_file_fails_at_once() {
        let mut settling = Settling::default();
        let now = Instant::now();
        assert_eq!(settling.on_failure(Path::new("a.png"), Some(Duration::from_secs(60)), now), Retry::GiveUp);
    }

    #[test]
    fn a_file_dated_in_the_future_is_not_retried_forever() {
        let mut settling = Settling::default();
        let file = Path::new("a.png");
        let start = Instant::now();
        assert_eq!(settling.on_failure(file, None, start), Retry::Again);
        assert_eq!(settling.on_failure(file, None, start + SETTLE), Retry::GiveUp);
    }

    #[test]
    fn files_that_are_gone_are_forgotten() {
        let mut settling = Settling::default();
        let now = Instant::now();
        settling.on_failure(Path::new("a.png"), None, now);
        settling.on_failure(Path::new("b.png"), None, now);
        settling.retain_present(&HashSet::from([PathBuf::from("b.png")]));
        assert_eq!(settling.first_failed.len(), 1);
    }
}
