//! File events for the watched folder and the inbox (inotify on Linux, through `notify`): a file
//! closed after writing or renamed in wakes the folder poll at once instead of at its next
//! tick. The poll still runs every `watch.poll_ms`, so a file system without events (a network
//! share, say) is read as before.

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};

use super::Folders;

/// Whether an event means a file may now be ready to read: closed after writing, or renamed
/// in. A file being created or written to is not ready yet. A new folder (an inbox class made
/// with files following at once) wakes too: files that land in it before its own watch is in
/// place give no event of their own.
pub fn wakes(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both | RenameMode::Any))
            | EventKind::Create(CreateKind::Folder)
    )
}

/// Watches the folders; the receiver gets a wake-up (coalesced: one waiting at most) per ready
/// file. `None`, with a warning, where the file system gives no events: the poll alone goes on.
pub fn watch(folders: &Folders) -> Option<(notify::RecommendedWatcher, tokio::sync::mpsc::Receiver<()>)> {
    let (wake, woken) = tokio::sync::mpsc::channel(1);
    let handler = move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|event| wakes(&event.kind)) {
            let _ = wake.try_send(());
        }
    };
    let watched = notify::recommended_watcher(handler).and_then(|mut watcher| {
        watcher.watch(&folders.watch, RecursiveMode::NonRecursive)?;
        watcher.watch(&folders.inbox, RecursiveMode::Recursive)?;
        Ok(watcher)
    });
    match watched {
        Ok(watcher) => Some((watcher, woken)),
        Err(error) => {
            tracing::warn!(%error, poll_ms = folders.poll.as_millis() as u64,
                "no file events for the watched folder and the inbox; polling them only");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::DataChange;

    #[test]
    fn a_file_wakes_the_poll_once_closed_after_writing_or_renamed_in() {
        assert!(wakes(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(wakes(&EventKind::Modify(ModifyKind::Name(RenameMode::To))));
        assert!(!wakes(&EventKind::Create(CreateKind::File)), "still being written");
        assert!(wakes(&EventKind::Create(CreateKind::Folder)), "a new inbox class may hold files already");
        assert!(!wakes(&EventKind::Modify(ModifyKind::Data(DataChange::Any))), "still being written");
        assert!(!wakes(&EventKind::Modify(ModifyKind::Name(RenameMode::From))), "moved out");
        assert!(!wakes(&EventKind::Access(AccessKind::Close(AccessMode::Read))));
    }
}
